/* cache_policy.c - when the server reuses, saves and restores KV state
 * (docs/SERVING.md C.2-C.4). The engine decides *what* a session payload holds,
 * kvstore keeps the bytes on disk; this file picks the moments.
 *
 * Reuse decision for a request with prompt tokens `req` and text `text`,
 * against the live session holding tokens `live` (length L):
 *   5. live is a token prefix of req            -> E = req
 *   7. the token text of live is a byte prefix of text
 *                                               -> E = live + tokenize(rest)
 *   8. otherwise, with the disk cache on: save the live session (reason
 *      evict) when L >= min, then restore the longest stored checkpoint whose
 *      key text is a byte prefix of text -> E = stored + tokenize(rest)
 *   9. otherwise E = req (cold), with a cold save of the chat anchor or an
 *      aligned prefix when min <= |E| <= cold_max.
 * Suffixes are tokenized from the exact byte boundary, never taken from req
 * (full-prompt BPE may merge across it). K reported to clients is the number
 * of tokens the engine kept (ds4_sync_info.n_reused), P = |E|.
 * Before rule 5, the live bindings of C.3 (rules 1 and 6): if the prompt
 * text starts with the visible text bound at the live position, E = live +
 * EOS + tokenize(rest). The EOS is appended deliberately (C.3 "quirk": ds4
 * resumes without it, leaving the previous turn unterminated in the KV).
 * Rules 2-3 (tool outputs): the live tool binding (the call ids of the last
 * Responses turn that ended with stop/tool_calls, or Anthropic turn with tool
 * calls, at the live position) equals, as a set, the ids of the request's
 * trailing tool outputs, the request begins with the turn's head and holds
 * between it and the outputs nothing (rule 3) or the turn's assistant
 * message as the client received it (rule 2: content, reasoning or none, the
 * same calls, srv_calls_match) -> E = live + tokenize(EOS + tail rendered
 * alone). Rule 4: a request whose
 * outputs have no call in it (requires_live) and matched none of 1-3 gets
 * SRV_CACHE_CONFLICT (409) without touching the session or the bindings.
 *
 * Thread-safety: worker thread only (the kvstore has its own lock), except
 * the tool binding's ids, which client threads read under tool_mu
 * (srv_cache_live_call) and only the worker writes.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvstore.h"
#include "server.h"
#include "util/xalloc.h"

struct srv_cache {
    ds4_kvstore *kv;       /* NULL when the disk cache is off */
    int bind_kind;         /* SRV_BIND_* */
    int bind_pos;          /* live length the binding belongs to */
    char *bind_text;       /* (bind_len) visible text */
    size_t bind_len;
    int last_frontier;     /* last stored/loaded length (continued saves) */
    int step;              /* continued-save spacing in tokens (0 = off) */
    bool cold_cut;         /* the last cold request was cancelled before its cold save (the live
                            * session holds part of it): the next request extending it saves it */
    /* live tool binding (C.3); ids written by the worker under tool_mu */
    pthread_mutex_t tool_mu;
    int tool_api;          /* srv_api of the turn, -1 when none */
    int tool_pos;          /* live length it belongs to */
    char **tool_ids;       /* (n_tool_ids) call ids of the turn */
    int n_tool_ids;
    size_t tool_head_len;  /* the turn's request text up to its assistant message, */
    uint64_t tool_head_hash; /* by length and FNV-1a: a later request must begin with it */
    /* the turn as the client received it (rule 2 compares the assistant
     * message a request carries between that head and its outputs) */
    char *turn_content, *turn_reasoning; /* invalid UTF-8 as U+FFFD; reasoning NULL when none */
    ds4_tool_call *turn_calls;           /* (n_turn_calls) names and internal arguments */
    int n_turn_calls;
    char *turn_raw;                      /* (turn_raw_len) the sampled block */
    size_t turn_raw_len;
};

static uint64_t fnv1a(const char *p, size_t n) {
    uint64_t h = 14695981039346656037ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)p[i]) * 1099511628211ull;
    return h;
}

/* Forgets the tool binding (worker thread). */
static void tool_clear(struct srv_cache *c) {
    pthread_mutex_lock(&c->tool_mu);
    for (int i = 0; i < c->n_tool_ids; i++) free(c->tool_ids[i]);
    free(c->tool_ids);
    c->tool_ids = NULL;
    c->n_tool_ids = 0;
    c->tool_api = -1;
    free(c->turn_content);
    free(c->turn_reasoning);
    for (int k = 0; k < c->n_turn_calls; k++) {
        free(c->turn_calls[k].name);
        free(c->turn_calls[k].arguments);
    }
    free(c->turn_calls);
    free(c->turn_raw);
    c->turn_content = c->turn_reasoning = c->turn_raw = NULL;
    c->turn_calls = NULL;
    c->n_turn_calls = 0;
    c->turn_raw_len = 0;
    pthread_mutex_unlock(&c->tool_mu);
}

bool srv_cache_live_call(srv_server *s, srv_api api, const char *id) {
    struct srv_cache *c = s->cache;
    if (!c || !id) return false;
    bool hit = false;
    pthread_mutex_lock(&c->tool_mu);
    if (c->tool_api == (int)api)
        for (int i = 0; i < c->n_tool_ids && !hit; i++) hit = !strcmp(c->tool_ids[i], id);
    pthread_mutex_unlock(&c->tool_mu);
    return hit;
}

/* Rules 2-3: the request's trailing tool-output ids equal the binding's id
 * set at live length L (worker thread: no lock needed for reads). */
static bool tool_binding_matches(const struct srv_cache *c, const srv_request *rq, int L) {
    if (!rq->tail_text || c->tool_api != (int)rq->api || c->tool_pos != L || !c->n_tool_ids)
        return false;
    /* the rest of the request is the turn's: the same system block, tools and
     * history before the assistant message (a new system prompt or tool list
     * with the same tool outputs continued the old state) */
    if (!rq->text || rq->text_len < c->tool_head_len || fnv1a(rq->text, c->tool_head_len) != c->tool_head_hash)
        return false;
    /* and what lies between that head and the tool outputs is nothing (rule
     * 3) or the turn's own assistant message (rule 2): an edited call, an
     * inserted message or other content there never reached the model when
     * only the outputs were appended to the live state */
    const size_t eos = strlen(DS4_EOS);
    if (rq->tail_len < eos || !rq->chat || !rq->msg_off) return false;
    const size_t body = rq->tail_len - eos; /* the outputs as the request renders them */
    if (rq->text_len - c->tool_head_len < body ||
        memcmp(rq->text + rq->text_len - body, rq->tail_text + eos, body))
        return false;
    const size_t tail_at = rq->text_len - body;
    if (tail_at != c->tool_head_len) {
        /* rule 2: one message, the assistant's, spans the whole gap */
        const int k = rq->tail_first - 1;
        if (k < 0 || k >= rq->chat->n_msgs) return false;
        const ds4_chat_msg *m = &rq->chat->msgs[k];
        if (m->role != DS4_ROLE_ASSISTANT || rq->msg_off[k] != c->tool_head_len || rq->msg_off[k + 1] != tail_at)
            return false;
        if (!c->turn_content || strlen(c->turn_content) != m->content_len ||
            memcmp(c->turn_content, m->content, m->content_len))
            return false;
        if (m->reasoning_len && (!c->turn_reasoning || strlen(c->turn_reasoning) != m->reasoning_len ||
                                 memcmp(c->turn_reasoning, m->reasoning, m->reasoning_len)))
            return false;
        if (!srv_calls_match(m, c->turn_calls, c->n_turn_calls, c->turn_raw, c->turn_raw_len)) return false;
    }
    for (int i = 0; i < rq->n_tail_ids; i++) {
        bool in = false;
        for (int k = 0; k < c->n_tool_ids && !in; k++) in = !strcmp(rq->tail_ids[i], c->tool_ids[k]);
        if (!in) return false;
    }
    for (int k = 0; k < c->n_tool_ids; k++) {
        bool in = false;
        for (int i = 0; i < rq->n_tail_ids && !in; i++) in = !strcmp(rq->tail_ids[i], c->tool_ids[k]);
        if (!in) return false;
    }
    return true;
}

static void kv_log(void *user, const char *line) {
    (void)user;
    srv_log("kv cache: %s", line);
}

int srv_cache_open(srv_server *s, ds4_err *err) {
    struct srv_cache *c = xcalloc(1, sizeof *c);
    s->cache = c;
    pthread_mutex_init(&c->tool_mu, NULL);
    c->tool_api = -1;
    const srv_config *cfg = &s->cfg;
    if (cfg->kv_continued_interval > 0) {
        int a = cfg->kv_boundary_align > 0 ? cfg->kv_boundary_align : 1;
        c->step = (cfg->kv_continued_interval + a - 1) / a * a;
    }
    if (!cfg->kv_disk_dir) return 0;
    ds4_kvstore_opts o = {0};
    o.dir = cfg->kv_disk_dir;
    o.budget_bytes = cfg->kv_disk_space_mb << 20;
    /* the model and the numerics: a server with other numerics switches keeps its own files (their payloads
     * would be refused, and an entry of the same tokens was then never written again) */
    ds4_engine_state_id(s->engine, o.fingerprint);
    o.log = kv_log;
    ds4_err e2 = {0};
    if (ds4_kvstore_open(&c->kv, &o, &e2)) {
        /* the cache is an optimization: run without it (C.4 table) */
        srv_log("kv cache: disabled: %s", e2.msg);
        c->kv = NULL;
    } else {
        srv_log("kv cache: %s (%.1f MiB used of %llu MiB)", cfg->kv_disk_dir,
                ds4_kvstore_total_bytes(c->kv) / 1048576.0, (unsigned long long)cfg->kv_disk_space_mb);
    }
    (void)err;
    return 0;
}

void srv_cache_close(srv_server *s) {
    if (!s->cache) return;
    if (s->cache->kv) ds4_kvstore_close(s->cache->kv);
    free(s->cache->bind_text);
    tool_clear(s->cache);
    pthread_mutex_destroy(&s->cache->tool_mu);
    free(s->cache);
    s->cache = NULL;
}

/* Concatenated decodings of tokens[0..n) (TEXT A.7), malloc'ed. */
static char *token_text(ds4_engine *e, const int32_t *tokens, int n, size_t *len) {
    ds4_buf b = DS4_BUF_INIT;
    for (int i = 0; i < n; i++) {
        size_t k = 0;
        const char *p = ds4_token_bytes(e, tokens[i], &k);
        if (p) ds4_buf_append(&b, p, k);
    }
    if (!ds4_buf_ok(&b)) {
        ds4_buf_free(&b);
        return NULL;
    }
    return ds4_buf_detach(&b, len);
}

/* E = prefix tokens + tokenize(text[off..len)). */
static int extend_with_text(ds4_engine *e, const int32_t *prefix, int n_prefix, const char *text,
                            size_t off, size_t len, int32_t **out, int *n_out, ds4_err *err) {
    int32_t *tail = NULL;
    int n_tail = 0;
    if (off < len) {
        int rc = srv_tokenize(e, text + off, len - off, &tail, &n_tail, err);
        if (rc) return rc;
    }
    int32_t *all = malloc(((size_t)n_prefix + (size_t)n_tail + 1) * sizeof *all);
    if (!all) {
        free(tail);
        return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    }
    memcpy(all, prefix, (size_t)n_prefix * sizeof *all);
    if (n_tail) memcpy(all + n_prefix, tail, (size_t)n_tail * sizeof *all);
    free(tail);
    *out = all;
    *n_out = n_prefix + n_tail;
    return 0;
}

/* Saves the whole live session with the given reason. */
static void save_live(srv_server *s, int reason) {
    struct srv_cache *c = s->cache;
    if (!c->kv) return;
    int n = ds4_session_n_tokens(s->session);
    if (n < s->cfg.kv_min_tokens || n <= 0) return;
    const int32_t *toks = ds4_session_tokens(s->session);
    size_t klen = 0;
    char *key = token_text(s->engine, toks, n, &klen);
    if (!key) {
        srv_log("kv cache: save failed: out of memory");
        return;
    }
    ds4_buf trailer = DS4_BUF_INIT;
    if (s->replay && !s->cfg.disable_exact_dsml_replay) {
        pthread_mutex_lock(&s->replay_mu);
        ds4_dsml_replay_save(s->replay, key, klen, &trailer);
        pthread_mutex_unlock(&s->replay_mu);
        /* a map with no entries ("KTM\x01" + a zero count) is no trailer */
        if (trailer.len == 8 && !memcmp(trailer.data + 4, "\0\0\0\0", 4)) trailer.len = 0;
    }
    /* the same tokens and text are the same state (the engine is
     * deterministic): an entry already on disk is not written again, unless
     * this server cannot use it (written at a larger --ctx: the lookup
     * passes it over, so it would never be rewritten; C.4 "an incompatible
     * one is deleted and rewritten") */
    ds4_kvstore_entry have;
    if (!trailer.len && ds4_kvstore_has(c->kv, toks, (uint32_t)n, key, klen, &have) && !have.trailer_bytes &&
        have.ctx_size <= (uint32_t)s->cfg.n_ctx) {
        c->last_frontier = n;
        ds4_buf_free(&trailer);
        free(key);
        return;
    }
    void *payload = NULL;
    size_t pbytes = 0;
    ds4_err err = {0};
    if (ds4_session_save(s->session, &payload, &pbytes, &err)) {
        srv_log("kv cache: save failed: %s", err.msg);
        ds4_buf_free(&trailer);
        free(key);
        return;
    }
    ds4_kvstore_put_args a = {0};
    a.tokens = toks;
    a.n_tokens = (uint32_t)n;
    a.key_text = key;
    a.key_text_bytes = klen;
    a.payload = payload;
    a.payload_bytes = pbytes;
    a.trailer = trailer.len ? trailer.data : NULL;
    a.trailer_bytes = trailer.len;
    a.ctx_size = (uint32_t)s->cfg.n_ctx;
    a.quant_bits = 4; /* informative only: the engine API does not expose it */
    a.reason = (uint8_t)reason;
    a.ext_flags = trailer.len ? DS4_KV_EXT_TOOL_MAP : 0;
    char name[DS4_KV_NAME_MAX];
    static const char *const why[] = {"unknown", "cold", "continued", "evict", "shutdown"};
    if (ds4_kvstore_put(c->kv, &a, name, &err))
        srv_log("kv cache: store failed (%s): %s", why[reason], err.msg);
    else {
        srv_log("kv cache stored tokens=%d reason=%s file=%s bytes=%zu", n, why[reason], name, pbytes);
        c->last_frontier = n;
    }
    free(payload);
    free(key);
    ds4_buf_free(&trailer);
}

/* Stored prefix length of a cold save (C.4 "cold"). */
static int cold_store_len(srv_server *s, const int32_t *E, int n) {
    const srv_config *cfg = &s->cfg;
    int32_t user = ds4_token_special(s->engine, DS4_TOK_USER);
    int32_t asst = ds4_token_special(s->engine, DS4_TOK_ASSISTANT);
    int first_asst = -1, anchor = -1;
    for (int i = 0; i < n; i++)
        if (E[i] == asst) {
            first_asst = i;
            break;
        }
    for (int i = (first_asst < 0 ? n : first_asst) - 1; i >= 0; i--)
        if (E[i] == user) {
            anchor = i;
            break;
        }
    if (anchor >= cfg->kv_min_tokens) return anchor;
    if ((int64_t)n > (int64_t)cfg->kv_min_tokens + cfg->kv_boundary_trim) { /* both options reach INT_MAX */
        int st = n - cfg->kv_boundary_trim;
        if (cfg->kv_boundary_align > 0) st = st / cfg->kv_boundary_align * cfg->kv_boundary_align;
        if (st >= cfg->kv_min_tokens) return st;
    }
    return n;
}

/* Tries a disk restore for text; on success the session holds the stored
 * checkpoint and E, nE hold the effective prompt. An entry of no more than
 * `keep` tokens (what the session's own checkpoints reuse for the request:
 * a regenerated reply) is not loaded: the sync then rewinds in memory. */
static bool disk_restore(srv_server *s, srv_job *j, int keep, int32_t **E, int *nE, bool *retry) {
    struct srv_cache *c = s->cache;
    srv_request *rq = &j->rq;
    ds4_kvstore_filter f = {0};
    f.max_ctx = (uint32_t)s->cfg.n_ctx;
    f.min_tokens = (uint32_t)s->cfg.kv_min_tokens;
    if (s->cfg.kv_reject_different_quant) f.quant_bits = 4; /* what save_live writes */
    /* An entry whose tokens are a prefix of the request's own tokens comes
     * first: the request then runs on exactly the tokens of a cold run (a
     * text match cut inside a BPE merge would tokenize the rest differently
     * and could change the answer after a restart). Else the longest key
     * text (entries holding generated tokens, whose text re-tokenizes
     * otherwise), continued by the tokens of the rest of the text. */
    ds4_kvstore_entry ent, et;
    const bool by_text = ds4_kvstore_find_text(c->kv, rq->text, rq->text_len, &f, &ent);
    const bool by_tokens = ds4_kvstore_find_tokens(c->kv, rq->tokens, (size_t)rq->n_tokens, &f, &et) &&
                           (!by_text || et.n_tokens >= ent.n_tokens);
    if (by_tokens) ent = et;
    else if (!by_text) return false;
    if ((int)ent.n_tokens <= keep) {
        srv_log("kv cache: %s holds %u tokens, the session's checkpoint keeps %d: not loaded", ent.name,
                ent.n_tokens, keep);
        return false;
    }
    ds4_kvstore_item it = {0};
    ds4_err err = {0};
    if (ds4_kvstore_load(c->kv, ent.name, &it, &err)) {
        srv_log("kv cache: rejected %s: %s", ent.name, err.msg);
        *retry = err.code == DS4_E_FORMAT; /* removed as invalid: the next best may serve */
        return false;
    }
    bool ok = false;
    /* the stored tokens as a prefix of the request's: the request's tokens are used as they are */
    const bool exact = it.meta.n_tokens <= (uint32_t)rq->n_tokens &&
                       !memcmp(it.tokens, rq->tokens, (size_t)it.meta.n_tokens * sizeof(int32_t));
    if (by_tokens ? !exact
                  : it.meta.key_text_bytes > rq->text_len || memcmp(it.key_text, rq->text, it.meta.key_text_bytes) != 0) {
        srv_log("kv cache: %s key is not a prefix of the prompt; not used", ent.name);
    } else if (ds4_session_load(s->session, it.payload, it.meta.payload_bytes, &err)) {
        /* The file passed the store's checks (digests, name, the state id) but the engine refuses its payload:
         * it can never load here. Kept, it was refused on every request and, its name taken, the same prefix
         * was never stored again; so it goes, and the caller looks again (a shorter entry may serve). */
        ds4_err rm = {0};
        if (ds4_kvstore_remove(c->kv, ent.name, &rm))
            srv_log("kv cache: payload of %s rejected: %s; not removed: %s", ent.name, err.msg, rm.msg);
        else
            srv_log("kv cache: payload of %s rejected: %s; removed", ent.name, err.msg);
        *retry = true; /* gone from the index either way */
    } else if (ds4_session_n_tokens(s->session) != (int)it.meta.n_tokens) {
        ds4_err rm = {0};
        if (ds4_kvstore_remove(c->kv, ent.name, &rm))
            srv_log("kv cache: %s holds %d tokens, header says %u: corrupt, not used; %s",
                    ent.name, ds4_session_n_tokens(s->session), it.meta.n_tokens, rm.msg);
        else {
            srv_log("kv cache: %s holds %d tokens, header says %u: discarded corrupt", ent.name,
                    ds4_session_n_tokens(s->session), it.meta.n_tokens);
            *retry = true;
        }
        ds4_session_rewind(s->session, 0, NULL);
    } else if (exact ? !extend_with_text(s->engine, rq->tokens, rq->n_tokens, NULL, 0, 0, E, nE, &err)
                     : !extend_with_text(s->engine, it.tokens, (int)it.meta.n_tokens, rq->text,
                                         it.meta.key_text_bytes, rq->text_len, E, nE, &err)) {
        if (it.trailer && s->replay) {
            pthread_mutex_lock(&s->replay_mu);
            ds4_dsml_replay_load(s->replay, it.trailer, it.meta.trailer_bytes, NULL, 0, NULL, NULL);
            pthread_mutex_unlock(&s->replay_mu);
        }
        srv_log("kv cache hit %s tokens=%u key=%s", by_tokens ? "tokens" : "text", it.meta.n_tokens, ent.name);
        c->last_frontier = (int)it.meta.n_tokens;
        ds4_err rm = {0};
        if ((int)it.meta.n_tokens > s->cfg.kv_cold_max_tokens && s->cfg.kv_cold_max_tokens > 0 &&
            ds4_kvstore_remove(c->kv, ent.name, &rm)) /* consumed: the live session owns it */
            srv_log("kv cache: consumed entry not removed: %s", rm.msg);
        ok = true;
    }
    ds4_kvstore_item_free(&it);
    return ok;
}

int srv_cache_prepare(srv_server *s, srv_job *j, int *cached, int *n_prompt,
                      ds4_progress_fn progress, void *pu, ds4_err *err) {
    struct srv_cache *c = s->cache;
    srv_request *rq = &j->rq;
    int L = ds4_session_n_tokens(s->session);
    const int32_t *live = ds4_session_tokens(s->session);
    int32_t *E = NULL;
    int nE = 0;
    const char *rule = "cold";
    bool cold = false, token_prefix = false;
    int want_bind = rq->api == SRV_API_RESPONSES ? SRV_BIND_RESPONSES
                    : rq->api == SRV_API_COMPLETIONS ? SRV_BIND_NONE
                                                     : SRV_BIND_THINKING;
    if (L > 0 && c->bind_kind && c->bind_kind == want_bind && c->bind_pos == L &&
        rq->text_len > c->bind_len && !memcmp(rq->text, c->bind_text, c->bind_len)) {
        /* rules 1 and 6: live + EOS + the text after the visible prefix */
        int32_t *with_eos = malloc(((size_t)L + 1) * sizeof *with_eos);
        if (!with_eos) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
        memcpy(with_eos, live, (size_t)L * sizeof *live);
        with_eos[L] = ds4_token_special(s->engine, DS4_TOK_EOS);
        int rc = extend_with_text(s->engine, with_eos, L + 1, rq->text, c->bind_len, rq->text_len,
                                  &E, &nE, err);
        free(with_eos);
        if (rc) return rc;
        rule = "visible-prefix";
    } else if (L > 0 && tool_binding_matches(c, rq, L)) {
        /* rules 2 and 3: live + tokenize(EOS + tool outputs + ... + prefix) */
        int rc = extend_with_text(s->engine, live, L, rq->tail_text, 0, rq->tail_len, &E, &nE, err);
        if (rc) return rc;
        rule = "tool-output";
    } else if (rq->requires_live) {
        srv_log("live tool binding gone (live=%d): continuation state not available", L);
        return SRV_CACHE_CONFLICT; /* rule 4 */
    } else if (L > 0 && L <= rq->n_tokens && !memcmp(live, rq->tokens, (size_t)L * sizeof *live)) {
        rule = "token-prefix"; /* rule 5 */
        token_prefix = true;
    } else if (L > 0) {
        size_t tl = 0;
        char *lt = token_text(s->engine, live, L, &tl);
        if (lt && tl <= rq->text_len && !memcmp(lt, rq->text, tl)) {
            int rc = extend_with_text(s->engine, live, L, rq->text, tl, rq->text_len, &E, &nE, err);
            free(lt);
            if (rc) return rc;
            rule = "text-prefix"; /* rule 7 */
        } else {
            free(lt);
        }
    }
    if (E && nE >= s->cfg.n_ctx && rq->requires_live) {
        free(E); /* the request cannot be served without the live state */
        return ds4_err_set(err, DS4_E_RANGE, "prompt exceeds context");
    }
    if (E && nE >= s->cfg.n_ctx) {
        /* the kept hidden state (e.g. old reasoning) would overflow the
         * context: start over from the request's own tokens */
        free(E);
        E = NULL;
        nE = 0;
        rule = "cold";
    }
    if (!E && !token_prefix) {
        if (L > 0)
            srv_log("live kv cache miss (live=%d prompt=%d) reason=%s", L, rq->n_tokens,
                    L > rq->n_tokens && !memcmp(live, rq->tokens, (size_t)rq->n_tokens * sizeof *live)
                        ? "prompt-is-a-shorter-prefix" /* the live state runs past it: not rewound */
                        : "token-mismatch");
        if (c->kv) {
            save_live(s, DS4_KV_REASON_EVICT);
            /* an entry removed as unusable makes way for the next best (a few at most) */
            const int keep = ds4_session_reusable(s->session, rq->tokens, rq->n_tokens);
            bool retry = true, hit = false;
            for (int k = 0; k < 4 && retry && !hit; k++) {
                retry = false;
                hit = disk_restore(s, j, keep, &E, &nE, &retry);
            }
            if (hit) rule = "disk";
        }
        if (!E) {
            cold = true;
            c->last_frontier = 0;
        }
    }
    if (!E) {
        E = malloc((size_t)rq->n_tokens * sizeof *E);
        if (!E) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
        memcpy(E, rq->tokens, (size_t)rq->n_tokens * sizeof *E);
        nE = rq->n_tokens;
    }
    if (nE >= s->cfg.n_ctx) {
        free(E);
        return ds4_err_set(err, DS4_E_RANGE, "prompt exceeds context");
    }
    ds4_sync_info info = {0};
    int rc = 0;
    /* a cold request cancelled before its cold save left part of its prompt
     * live (a client that hung up): the retry continues it, and still saves */
    const bool resumed = token_prefix && c->cold_cut;
    if (resumed) cold = true;
    c->cold_cut = false;
    /* cold save: sync to the stored prefix first, save, then extend */
    if (cold && c->kv && nE >= s->cfg.kv_min_tokens &&
        (s->cfg.kv_cold_max_tokens == 0 ? false : nE <= s->cfg.kv_cold_max_tokens)) {
        int sl = cold_store_len(s, E, nE);
        if (!resumed || sl >= ds4_session_n_tokens(s->session)) { /* a resumed one never rewinds for it */
            rc = ds4_session_sync(s->session, E, sl, &info, progress, pu, err);
            if (!rc) save_live(s, DS4_KV_REASON_COLD);
            else if (rc == DS4_E_CANCEL) c->cold_cut = true;
        }
    }
    ds4_sync_info info2 = {0};
    if (!rc) rc = ds4_session_sync(s->session, E, nE, &info2, progress, pu, err);
    free(E);
    /* after a successful prefill, bindings not used by this request are
     * cleared (C.2; after a failed one the live state is not trusted
     * either); until then a queued request may still validate its tool
     * outputs against them (and get 409 when it runs, rule 4) */
    c->bind_kind = SRV_BIND_NONE;
    tool_clear(c);
    if (rc) return rc;
    int reused = cold && info.n_evaluated + info.n_reused > 0 ? info.n_reused : info2.n_reused;
    *cached = reused;
    *n_prompt = nE;
    srv_log("kv reuse %s: cached %d..%d:%d", rule, reused, nE, nE - reused);
    return 0;
}

void srv_cache_step(srv_server *s, bool in_tool_call) {
    struct srv_cache *c = s->cache;
    if (!c->kv || c->step <= 0 || in_tool_call) return;
    int n = ds4_session_n_tokens(s->session);
    /* at the first boundary (prefill batch, decode or MTP cycle) at or past each multiple of the interval: an
     * MTP cycle advances several tokens and stepped over most multiples (a long generation then kept one
     * continued save in four or so) */
    if (n > 0 && n / c->step > c->last_frontier / c->step && n >= s->cfg.kv_min_tokens) {
        save_live(s, DS4_KV_REASON_CONTINUED);
        c->last_frontier = n; /* also after a failed save: tried again at the next multiple, not every token */
    }
}

void srv_cache_invalidate(srv_server *s) {
    /* The engine's session holds exactly the tokens it evaluated, so a token
     * prefix match stays exact; only the continued-save frontier restarts. */
    s->cache->last_frontier = ds4_session_n_tokens(s->session);
}

int srv_binding_kind(const srv_request *rq, const srv_result *r, int n_ctx, bool stop_hit) {
    if (stop_hit) return SRV_BIND_NONE;
    bool thinking = ds4_chat_effective_think(rq->think, n_ctx) != DS4_THINK_NONE;
    if (rq->api == SRV_API_RESPONSES)
        return r->finish == SRV_FINISH_STOP || r->finish == SRV_FINISH_TOOL_CALLS
                   ? SRV_BIND_RESPONSES
                   : SRV_BIND_NONE;
    if (rq->api == SRV_API_COMPLETIONS || !thinking || !rq->chat || ds4_chat_continues(rq->chat)) return SRV_BIND_NONE;
    if (srv_tools_active(rq) || ds4_chat_tool_context(rq->chat) || r->parsed.n_calls ||
        r->finish != SRV_FINISH_STOP || !r->think_closed)
        return SRV_BIND_NONE;
    return SRV_BIND_THINKING;
}

char *srv_visible_text(const srv_request *rq, const srv_result *r, int kind, int n_ctx,
                       size_t *len) {
    ds4_buf b = DS4_BUF_INIT;
    const ds4_dsml_result *p = &r->parsed;
    bool thinking = ds4_chat_effective_think(rq->think, n_ctx) != DS4_THINK_NONE;
    size_t tl = rq->text_len;
    if (kind == SRV_BIND_THINKING) {
        if (tl >= 7 && !memcmp(rq->text + tl - 7, DS4_THINK_OPEN, 7)) tl -= 7;
        ds4_buf_append(&b, rq->text, tl);
        ds4_buf_puts(&b, DS4_THINK_CLOSE);
        ds4_buf_append(&b, p->content, p->content_len);
    } else {
        ds4_buf_append(&b, rq->text, tl);
        if (thinking && rq->reasoning_summary && p->n_calls && p->reasoning)
            ds4_buf_append(&b, p->reasoning, p->reasoning_len);
        if (thinking) ds4_buf_puts(&b, DS4_THINK_CLOSE);
        ds4_buf_append(&b, p->content, p->content_len);
        if (p->n_calls && p->raw_dsml) ds4_buf_append(&b, p->raw_dsml, p->raw_dsml_len);
    }
    ds4_buf_puts(&b, DS4_EOS);
    if (!ds4_buf_ok(&b)) {
        ds4_buf_free(&b);
        return NULL;
    }
    return ds4_buf_detach(&b, len);
}

/* Bytes as the client received them (srv_jstr: invalid UTF-8 as U+FFFD). */
static char *as_sent(const char *p, size_t n) {
    json_t *v = srv_jstr(p, n);
    char *out = xmalloc(json_string_length(v) + 1);
    memcpy(out, json_string_value(v), json_string_length(v) + 1);
    json_decref(v);
    return out;
}

/* Keeps the tool turn as the client received it, for rule 2. */
static void tool_turn_keep(struct srv_cache *c, const ds4_dsml_result *p) {
    c->turn_content = as_sent(p->content, p->content_len);
    c->turn_reasoning = p->reasoning && p->reasoning_len ? as_sent(p->reasoning, p->reasoning_len) : NULL;
    c->turn_calls = xcalloc((size_t)p->n_calls + 1, sizeof *c->turn_calls);
    for (int k = 0; k < p->n_calls; k++) {
        c->turn_calls[k].name = xstrdup(p->calls[k].name ? p->calls[k].name : "");
        c->turn_calls[k].arguments = xmalloc(p->calls[k].arguments_len + 1);
        memcpy(c->turn_calls[k].arguments, p->calls[k].arguments, p->calls[k].arguments_len);
        c->turn_calls[k].arguments[p->calls[k].arguments_len] = 0;
        c->turn_calls[k].arguments_len = p->calls[k].arguments_len;
    }
    c->n_turn_calls = p->n_calls;
    if (p->raw_dsml) {
        c->turn_raw = xmalloc(p->raw_dsml_len + 1);
        memcpy(c->turn_raw, p->raw_dsml, p->raw_dsml_len);
        c->turn_raw[p->raw_dsml_len] = 0;
        c->turn_raw_len = p->raw_dsml_len;
    }
}

void srv_cache_bind(srv_server *s, srv_job *j, const srv_result *r, bool stop_hit) {
    struct srv_cache *c = s->cache;
    free(c->bind_text);
    c->bind_text = NULL;
    c->bind_kind = srv_binding_kind(&j->rq, r, s->cfg.n_ctx, stop_hit);
    tool_clear(c);
    bool tool_turn = !stop_hit && r->parsed.n_calls && !r->calls_dropped &&
                     ((j->rq.api == SRV_API_RESPONSES &&
                       (r->finish == SRV_FINISH_STOP || r->finish == SRV_FINISH_TOOL_CALLS)) ||
                      (j->rq.api == SRV_API_ANTHROPIC && r->finish == SRV_FINISH_TOOL_CALLS));
    if (tool_turn) {
        char **ids = xcalloc((size_t)r->parsed.n_calls, sizeof *ids);
        int n = 0;
        for (int i = 0; i < r->parsed.n_calls; i++)
            if (r->parsed.calls[i].id) ids[n++] = xstrdup(r->parsed.calls[i].id);
        pthread_mutex_lock(&c->tool_mu);
        c->tool_ids = ids;
        c->n_tool_ids = n;
        c->tool_api = (int)j->rq.api;
        c->tool_pos = ds4_session_n_tokens(s->session);
        /* the request's text without its generation prefix (Assistant +
         * think marker): the next request renders this turn's assistant
         * message there, or (rule 3) only the tool outputs */
        size_t hl = j->rq.text ? j->rq.text_len : 0;
        const char *marks[] = {DS4_THINK_OPEN, DS4_THINK_CLOSE};
        for (int k = 0; k < 2; k++) {
            const size_t ml = strlen(marks[k]);
            if (hl >= ml && !memcmp(j->rq.text + hl - ml, marks[k], ml)) {
                hl -= ml;
                break;
            }
        }
        const size_t al = strlen(DS4_ASSISTANT);
        if (hl >= al && !memcmp(j->rq.text + hl - al, DS4_ASSISTANT, al)) hl -= al;
        c->tool_head_len = hl;
        c->tool_head_hash = fnv1a(j->rq.text ? j->rq.text : "", hl);
        tool_turn_keep(c, &r->parsed);
        pthread_mutex_unlock(&c->tool_mu);
    }
    if (!c->bind_kind) return;
    c->bind_text = srv_visible_text(&j->rq, r, c->bind_kind, s->cfg.n_ctx, &c->bind_len);
    if (!c->bind_text) c->bind_kind = SRV_BIND_NONE;
    c->bind_pos = ds4_session_n_tokens(s->session);
}

void srv_cache_restore_tool_memory(srv_server *s, const srv_request *rq) {
    struct srv_cache *c = s->cache;
    if (!c || !c->kv || !s->replay || s->cfg.disable_exact_dsml_replay || !rq->chat) return;
    /* ids of replayed calls the in-memory map does not know */
    const char **ids = NULL;
    int n_ids = 0;
    pthread_mutex_lock(&s->replay_mu);
    for (int i = 0; i < rq->chat->n_msgs; i++) {
        const ds4_chat_msg *m = &rq->chat->msgs[i];
        for (int k = 0; k < m->n_calls; k++) {
            const char *id = m->calls[k].id;
            size_t len;
            if (!id || ds4_dsml_replay_get(s->replay, id, &len)) continue;
            ids = xrealloc(ids, sizeof *ids * (size_t)(n_ids + 1));
            ids[n_ids++] = id;
        }
    }
    pthread_mutex_unlock(&s->replay_mu);
    if (!n_ids) return;
    ds4_kvstore_entry *ents = NULL;
    int n = ds4_kvstore_list(c->kv, &ents);
    for (int i = 0; i < n; i++) {
        if (!(ents[i].ext_flags & DS4_KV_EXT_TOOL_MAP)) continue;
        void *tr = NULL;
        size_t tb = 0;
        if (ds4_kvstore_read_trailer(c->kv, ents[i].name, &tr, &tb, NULL) || !tr) continue;
        pthread_mutex_lock(&s->replay_mu);
        ds4_dsml_replay_load(s->replay, tr, tb, ids, n_ids, NULL, NULL);
        pthread_mutex_unlock(&s->replay_mu);
        free(tr);
    }
    free(ents);
    int found = 0;
    pthread_mutex_lock(&s->replay_mu);
    for (int i = 0; i < n_ids; i++) {
        size_t len;
        if (ds4_dsml_replay_get(s->replay, ids[i], &len)) found++;
    }
    pthread_mutex_unlock(&s->replay_mu);
    if (found) srv_log("tool memory: restored %d of %d ids from disk", found, n_ids);
    free(ids);
}

void srv_cache_shutdown(srv_server *s) {
    if (s->cache && s->cache->kv) save_live(s, DS4_KV_REASON_SHUTDOWN);
}
