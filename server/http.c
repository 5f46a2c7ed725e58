/* http.c - the HTTP layer on libmicrohttpd: one thread per connection,
 * routing (docs/SERVING.md B.3), body limits, CORS, the optional API key, JSON
 * error replies (B.10; paths under /v1/messages answer in Anthropic's error
 * shape, the others in OpenAI's), SSE responses and client-gone detection.
 *
 * Header-time checks (check_headers), made before any body byte is read:
 * differing duplicate Content-Length, two Host or Content-Type lines -> 400,
 * a Host that is not the bound address, localhost, 127.0.0.1 or
 * --allow-host -> 403, a transfer coding other than chunked -> 501, a
 * missing or wrong API key -> 401 (not for OPTIONS), a POST to an unknown
 * path -> 404 (a known one with the wrong method: 405), a POST whose
 * Content-Type is not application/json or whose Content-Encoding is not
 * identity -> 415, a Content-Length over the body limit with Expect:
 * 100-continue or over twice the limit -> 413.
 *
 * Every response carries "Connection: close" (one request per connection,
 * B.2). Request bodies are accumulated here up to SRV_MAX_BODY_BYTES; a
 * larger one is answered 413: at once when its Content-Length says so and
 * the client waits for 100 Continue or claims over twice the limit, else
 * drained and then answered. While a connection thread waits
 * for its job it polls the socket, so a client that hangs up cancels its
 * job (queued jobs are skipped, running ones stop at the next token).
 *
 * Shutdown order (srv_http_stop): the worker has already ended every job,
 * so the last SSE events and the 503 bodies of queued jobs sit in buffers
 * that only the connection threads write out. The listener is closed first,
 * then we wait (bounded by SRV_DRAIN_S) until every request that reached
 * the handler has completed, and only then stop the daemon, which shuts
 * down whatever sockets are left.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <microhttpd.h>

#include "server.h"
#include "util/num.h"
#include "util/xalloc.h"

/* Longest wait for open requests to finish at shutdown. */
#define SRV_DRAIN_S 10.0

/* One open connection, for the request deadline (socket_context slot).
 * Linked while libmicrohttpd holds the socket open: it reports CLOSED
 * before it closes the descriptor, so fd is valid while linked. */
typedef struct conn_rec {
    int fd;
    uint64_t client;        /* the peer (client_key): an IPv4 address or an IPv6 /64 */
    double t_open;          /* monotonic seconds at accept */
    bool request_in;        /* the whole request (headers and body) arrived */
    bool cut;               /* shut down by the deadline sweeper */
    struct conn_rec *prev, *next;
} conn_rec;

/* The HTTP side of the server (s->http). */
struct srv_http {
    int listen_fd;          /* bound by srv_http_listen; -1 once the daemon owns it */
    struct MHD_Daemon *d;
    pthread_mutex_t mu;     /* guards everything below */
    pthread_cond_t cv;      /* signalled when n_requests drops, and to stop the sweeper */
    int n_requests;         /* requests between the handler's first call and completion */
    conn_rec *conns;        /* open connections */
    pthread_t sweeper;
    bool sweeper_started, stop;
    long n_cut;             /* connections cut by the deadline since the last log line */
    long n_capped;          /* connections cut or refused by the per-client cap, same */
    long n_full;            /* connections cut or refused at the server's limit, same */
    long n_mhd_quiet;       /* libmicrohttpd messages dropped in this window */
    int n_mhd_logged;       /* libmicrohttpd messages logged in this window */
    double t_mhd_window;
    double t_cut_log;
};

/* Per-request state (owned by libmicrohttpd's con_cls slot). */
typedef struct conn_ctx {
    ds4_buf body;
    bool too_large;
    bool answered;    /* refused when the headers arrived; the body is not read */
    srv_api api;      /* POST route (and the error shape of the path) */
    bool count;       /* POST /v1/messages/count_tokens */
    srv_job *job;     /* reference held by this connection */
    srv_server *s;
} conn_ctx;

static int conn_fd(struct MHD_Connection *c) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    return ci ? ci->connect_fd : -1;
}

/* True when the peer closed its side (EOF or error). */
static bool peer_closed(int fd) {
    if (fd < 0) return false;
    struct pollfd p = {.fd = fd, .events = POLLIN | POLLRDHUP};
    if (poll(&p, 1, 0) <= 0) return false;
    if (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) return true;
    if (p.revents & POLLIN) {
        char b;
        ssize_t n = recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
        if (n == 0) return true;
    }
    return false;
}

static void add_common(srv_server *s, struct MHD_Response *r) {
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONNECTION, "close");
    if (s->cfg.cors) {
        MHD_add_response_header(r, "Access-Control-Allow-Origin", "*");
        MHD_add_response_header(r, "Access-Control-Allow-Methods", "GET, POST, OPTIONS");
        /* "*" does not cover Authorization (Fetch standard): name it */
        MHD_add_response_header(r, "Access-Control-Allow-Headers", "Authorization, *");
    }
}

/* Queues body (malloc'ed, taken over) as a JSON response. */
/* allow: the Allow header of a 405 (RFC 9110 15.5.6), else NULL */
static enum MHD_Result reply_json_allow(srv_server *s, struct MHD_Connection *c, unsigned status,
                                        char *body, bool newline, const char *allow) {
    size_t n = strlen(body);
    if (newline) {
        char *b2 = realloc(body, n + 2);
        if (b2) {
            body = b2;
            body[n++] = '\n';
            body[n] = 0;
        }
    }
    struct MHD_Response *r = MHD_create_response_from_buffer(n, body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    /* 429 (queue full) and 503 (shutting down, or the backend cannot run the
     * request now): when to try again, which the OpenAI and Anthropic SDKs'
     * retries honour */
    if (status == 429 || status == 503) MHD_add_response_header(r, MHD_HTTP_HEADER_RETRY_AFTER, "1");
    /* a 401 names the scheme it wants (RFC 9110 11.6.1): the key as a Bearer token (or x-api-key) */
    if (status == 401) MHD_add_response_header(r, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
    if (allow) MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, allow);
    add_common(s, r);
    enum MHD_Result ok = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ok;
}

static enum MHD_Result reply_json(srv_server *s, struct MHD_Connection *c, unsigned status, char *body,
                                  bool newline) {
    return reply_json_allow(s, c, status, body, newline, NULL);
}

static enum MHD_Result reply_error(srv_server *s, struct MHD_Connection *c, srv_api api,
                                   const srv_error *e) {
    return reply_json(s, c, (unsigned)e->status, srv_error_body(api, e), true);
}

/* 405 for a known path: its methods in the Allow header */
static enum MHD_Result reply_405(srv_server *s, struct MHD_Connection *c, const char *url, bool post) {
    srv_error e = {0};
    srv_fail(&e, 405, "method not allowed: use %s", post ? "POST" : "GET");
    srv_api api = url && !strncmp(url, "/v1/messages", 12) ? SRV_API_ANTHROPIC : SRV_API_CHAT;
    return reply_json_allow(s, c, 405, srv_error_body(api, &e), true, post ? "POST, OPTIONS" : "GET, HEAD, OPTIONS");
}

/* An error in the shape of the API the path belongs to: /v1/messages...
 * answers as Anthropic does, everything else as OpenAI does. */
static enum MHD_Result reply_simple_error(srv_server *s, struct MHD_Connection *c, const char *url,
                                          unsigned status, const char *code, const char *msg) {
    srv_error e = {0};
    srv_fail(&e, (int)status, "%s", msg);
    e.code = code;
    srv_api api = url && !strncmp(url, "/v1/messages", 12) ? SRV_API_ANTHROPIC : SRV_API_CHAT;
    return reply_error(s, c, api, &e);
}

static char *model_json(srv_server *s) {
    int ctx = s->cfg.n_ctx;
    int maxc = s->cfg.default_tokens < ctx ? s->cfg.default_tokens : ctx;
    /* OpenAI's model object (+ OpenRouter's context fields), and Anthropic's type, display_name,
     * created_at (RFC 3339 of the same instant), lifecycle and token limits for clients of its models API
     * (the anthropic SDK refuses a model object without them) */
    char created_at[32];
    const time_t ct = SRV_MODEL_CREATED;
    struct tm tmv;
    strftime(created_at, sizeof created_at, "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&ct, &tmv));
    json_t *m = json_pack(
        "{s:s, s:s, s:i, s:s, s:s, s:i, s:{s:i, s:i, s:b}, s:[s,s,s,s,s,s,s,s,s,s,s], s:s, s:s, s:s, s:s, s:i, s:i}",
        "id",
        SRV_MODEL_ID, "object", "model", "created", SRV_MODEL_CREATED, "owned_by", "ds4.c", "name",
        "DeepSeek V4 Flash", "context_length", ctx, "top_provider", "context_length", ctx,
        "max_completion_tokens", maxc, "is_moderated", 0, "supported_parameters", "tools",
        "tool_choice", "max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "seed",
        "stream", "reasoning_effort", "type", "model", "display_name", "DeepSeek V4 Flash", "created_at", created_at,
        "lifecycle", "active", "max_input_tokens", ctx, "max_tokens", maxc);
    char *t = srv_json_text(m);
    json_decref(m);
    return t;
}

/* --debug-slow-connection-ms: a connection thread that is late to write
 * (a loaded machine), for the shutdown-drain test. */
static void debug_slow(srv_server *s) {
    if (s->cfg.debug_slow_conn_ms > 0) usleep((useconds_t)s->cfg.debug_slow_conn_ms * 1000u);
}

/* The request of c has fully arrived (or was answered): its deadline is over. */
static void request_arrived(srv_server *s, struct MHD_Connection *c) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    conn_rec *r = ci ? ci->socket_context : NULL;
    if (!r) return;
    pthread_mutex_lock(&s->http->mu);
    r->request_in = true;
    pthread_mutex_unlock(&s->http->mu);
}

/* ---- SSE body --------------------------------------------------------------- */

typedef struct sse_src {
    srv_job *job;
    srv_server *s;
    int fd;
} sse_src;

static ssize_t sse_read(void *cls, uint64_t pos, char *buf, size_t max) {
    sse_src *x = cls;
    srv_stream *st = &x->job->st;
    (void)pos;
    debug_slow(x->s);
    pthread_mutex_lock(&st->mu);
    for (;;) {
        /* a client given up on (it stopped reading: the worker's write gave
         * up, and the generation ended with finish error) gets no more bytes
         * and no end of stream: what it has left to read would end as a
         * complete 200 without the finish, which SDKs take as a whole reply */
        if (st->client_gone) {
            pthread_mutex_unlock(&st->mu);
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
        if (st->pending.len) {
            size_t n = st->pending.len < max ? st->pending.len : max;
            memcpy(buf, st->pending.data, n);
            memmove(st->pending.data, st->pending.data + n, st->pending.len - n);
            ds4_buf_truncate(&st->pending, st->pending.len - n);
            st->last_drain = srv_now_mono();
            pthread_mutex_unlock(&st->mu);
            return (ssize_t)n;
        }
        if (st->done) {
            pthread_mutex_unlock(&st->mu);
            return MHD_CONTENT_READER_END_OF_STREAM;
        }
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 200 * 1000000L;
        if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
        pthread_cond_timedwait(&st->cv, &st->mu, &ts);
        if (!st->pending.len && !st->done && peer_closed(x->fd)) st->client_gone = true;
    }
}

static void sse_free(void *cls) {
    sse_src *x = cls;
    srv_job_cancel(x->job); /* no-op when it already finished */
    srv_job_release(x->s, x->job);
    free(x);
}

/* Waits until the job has decided its headers (streaming) or finished.
 * Polls the socket meanwhile; returns false when the client went away. */
static bool wait_job(srv_job *j, int fd, bool streaming) {
    srv_stream *st = &j->st;
    pthread_mutex_lock(&st->mu);
    while (!st->done && !(streaming && st->headers)) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 200 * 1000000L;
        if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
        pthread_cond_timedwait(&st->cv, &st->mu, &ts);
        if (!st->done && peer_closed(fd)) {
            st->client_gone = true;
            pthread_cond_broadcast(&st->cv);
            pthread_mutex_unlock(&st->mu);
            return false;
        }
    }
    pthread_mutex_unlock(&st->mu);
    return true;
}

static enum MHD_Result run_post(srv_server *s, struct MHD_Connection *c, conn_ctx *cx, srv_api api) {
    srv_error e = {0};
    if (cx->too_large) {
        srv_fail(&e, 413, "request body too large (limit %u bytes)", SRV_MAX_BODY_BYTES);
        return reply_error(s, c, api, &e);
    }
    if (cx->count) { /* answered here: rendering and tokenizing only */
        char *out = srv_count_tokens(s, cx->body.data ? cx->body.data : "", cx->body.len, &e);
        ds4_buf_free(&cx->body);
        return out ? reply_json(s, c, MHD_HTTP_OK, out, true) : reply_error(s, c, api, &e);
    }
    srv_job *j = srv_submit(s, api, cx->body.data ? cx->body.data : "", cx->body.len, &e);
    ds4_buf_free(&cx->body);
    if (!j) return reply_error(s, c, api, &e);
    cx->job = j;
    /* queued: no idle timeout while it waits and streams */
    MHD_set_connection_option(c, MHD_CONNECTION_OPTION_TIMEOUT, 0u);
    int fd = conn_fd(c);
    bool streaming = j->rq.stream;
    if (!wait_job(j, fd, streaming)) return MHD_NO; /* client gone: close */
    debug_slow(s);
    if (streaming && j->st.headers) {
        sse_src *x = xcalloc(1, sizeof *x);
        x->job = j;
        x->s = s;
        x->fd = fd;
        pthread_mutex_lock(&s->mu);
        j->refs++;
        pthread_mutex_unlock(&s->mu);
        struct MHD_Response *r =
            MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 32 * 1024, sse_read, x, sse_free);
        if (!r) {
            sse_free(x);
            return MHD_NO;
        }
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
        MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        add_common(s, r);
        enum MHD_Result ok = MHD_queue_response(c, MHD_HTTP_OK, r);
        MHD_destroy_response(r);
        return ok;
    }
    if (j->status != 200 || !j->body) {
        if (j->status == 200) srv_fail(&j->err, 500, "generation produced no response");
        return reply_error(s, c, api, &j->err);
    }
    char *body = j->body;
    j->body = NULL;
    /* the Responses object is the one JSON body without a final newline */
    return reply_json(s, c, MHD_HTTP_OK, body, api != SRV_API_RESPONSES);
}

/* Equal strings, in time that depends on the lengths only (the API key). */
static bool same_secret(const char *a, const char *b) {
    size_t na = strlen(a), nb = strlen(b);
    unsigned char d = na != nb;
    for (size_t i = 0; i < na; i++) d |= (unsigned char)(a[i] ^ b[i % (nb ? nb : 1)]);
    return d == 0;
}

static bool api_key_ok(srv_server *s, struct MHD_Connection *c) {
    const char *key = s->cfg.api_key;
    if (!key) return true; /* main.c refuses an empty key */
    const char *xk = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "x-api-key");
    if (xk && same_secret(xk, key)) return true;
    const char *au = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    return au && !strncasecmp(au, "Bearer ", 7) && same_secret(au + 7, key);
}

/* Host header check against DNS rebinding: a page of another site whose
 * name was made to resolve to this machine sends its own name as Host. The
 * host part (port and a trailing dot dropped) must be the bound address,
 * localhost, 127.0.0.1 or one of --allow-host ("*": any). A request without
 * Host (HTTP/1.0) passes: browsers always send one. */
static bool host_ok(srv_server *s, struct MHD_Connection *c) {
    const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_HOST);
    if (!h) return true;
    size_t n = strlen(h);
    if (h[0] == '[') { /* [IPv6]:port */
        const char *e = strchr(h, ']');
        n = e ? (size_t)(e - h) + 1 : n;
    } else {
        const char *colon = strrchr(h, ':');
        if (colon && strspn(colon + 1, "0123456789") == strlen(colon + 1)) n = (size_t)(colon - h);
    }
    if (n && h[n - 1] == '.') n--;
    const char *fixed[] = {"localhost", "127.0.0.1", s->cfg.host};
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++)
        if (strlen(fixed[i]) == n && !strncasecmp(h, fixed[i], n)) return true;
    for (int i = 0; i < s->cfg.n_allow_hosts; i++) {
        const char *a = s->cfg.allow_hosts[i];
        if (!strcmp(a, "*") || (strlen(a) == n && !strncasecmp(h, a, n))) return true;
    }
    return false;
}

/* Content-Type is application/json (parameters such as charset allowed).
 * Browsers send text/plain, form and multipart bodies cross-origin without
 * a preflight; JSON needs one, which --cors alone answers. */
static bool json_content_type(struct MHD_Connection *c) {
    const char *ct = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_TYPE);
    if (!ct) return false;
    while (*ct == ' ' || *ct == '\t') ct++;
    size_t n = strcspn(ct, ";");
    size_t m = n;
    while (m && (ct[m - 1] == ' ' || ct[m - 1] == '\t')) m--;
    if (m != 16 || strncasecmp(ct, "application/json", 16)) return false;
    /* a charset other than UTF-8 would be read as UTF-8: refuse it */
    for (const char *p = ct + n; *p;) {
        p += strspn(p, "; \t");
        size_t k = strcspn(p, ";");
        if (k >= 8 && !strncasecmp(p, "charset=", 8)) {
            const char *v = p + 8;
            size_t vl = k - 8;
            while (vl && (v[vl - 1] == ' ' || v[vl - 1] == '\t')) vl--;
            if (vl && (*v == '"')) v++, vl -= vl >= 2 ? 2 : 1;
            if (!((vl == 5 && !strncasecmp(v, "utf-8", 5)) || (vl == 4 && !strncasecmp(v, "utf8", 4))))
                return false;
        }
        p += k;
    }
    return true;
}

/* The header lines libmicrohttpd's lookup does not see past the first:
 * every Content-Length line must carry the same value (RFC 9112 6.3:
 * differing ones make the message length unknowable); Host must come once
 * (RFC 9112 3.2: 400 otherwise); Transfer-Encoding and Content-Type once
 * (a second line made the first one's check order-dependent: "chunked" then
 * "gzip" passed, as did application/json then text/plain); every
 * Content-Encoding line is checked, not just the first. */
typedef struct hdr_scan {
    const char *cl_first;
    bool cl_differ;
    int n_host, n_te, n_ct;
    const char *ce_bad; /* a Content-Encoding line that is not identity */
} hdr_scan;

static enum MHD_Result hdr_each(void *cls, enum MHD_ValueKind kind, const char *key, const char *value) {
    hdr_scan *x = cls;
    (void)kind;
    const char *v = value ? value : "";
    if (!strcasecmp(key, MHD_HTTP_HEADER_CONTENT_LENGTH)) {
        if (!x->cl_first) x->cl_first = v;
        else if (strcmp(x->cl_first, v)) x->cl_differ = true;
    } else if (!strcasecmp(key, MHD_HTTP_HEADER_HOST)) {
        x->n_host++;
    } else if (!strcasecmp(key, MHD_HTTP_HEADER_TRANSFER_ENCODING)) {
        x->n_te++;
    } else if (!strcasecmp(key, MHD_HTTP_HEADER_CONTENT_TYPE)) {
        x->n_ct++;
    } else if (!strcasecmp(key, MHD_HTTP_HEADER_CONTENT_ENCODING) && !x->ce_bad && *v && strcasecmp(v, "identity")) {
        x->ce_bad = v;
    }
    return MHD_YES;
}

static const struct {
    const char *path;
    srv_api api;
    bool count;
} g_routes[] = {{"/v1/chat/completions", SRV_API_CHAT, false},
                {"/v1/completions", SRV_API_COMPLETIONS, false},
                {"/v1/responses", SRV_API_RESPONSES, false},
                {"/v1/messages", SRV_API_ANTHROPIC, false},
                {"/v1/messages/count_tokens", SRV_API_ANTHROPIC, true}};

/* The checks that need only the request line and headers, made when they
 * arrive so a refused request is answered at once and its body never read
 * (or buffered). Returns MHD_YES with nothing queued when the request may
 * go on; otherwise the result of queueing the refusal. */
static enum MHD_Result check_headers(srv_server *s, struct MHD_Connection *c, conn_ctx *cx,
                                     const char *url, const char *method, const char *version, bool *refused) {
    *refused = true;
    hdr_scan hs = {0};
    MHD_get_connection_values(c, MHD_HEADER_KIND, hdr_each, &hs);
    if (hs.cl_differ) return reply_simple_error(s, c, url, MHD_HTTP_BAD_REQUEST, NULL, "bad HTTP request");
    if (hs.n_host > 1)
        return reply_simple_error(s, c, url, MHD_HTTP_BAD_REQUEST, NULL, "bad HTTP request: more than one Host header");
    if (hs.n_ct > 1)
        return reply_simple_error(s, c, url, MHD_HTTP_BAD_REQUEST, NULL,
                                  "bad HTTP request: more than one Content-Type header");
    /* HTTP/1.1 requires a Host header (RFC 9112 3.2); HTTP/1.0 may omit it */
    if (version && strcmp(version, MHD_HTTP_VERSION_1_0) &&
        !MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_HOST))
        return reply_simple_error(s, c, url, MHD_HTTP_BAD_REQUEST, NULL, "bad HTTP request: no Host header");
    if (!host_ok(s, c))
        return reply_simple_error(s, c, url, MHD_HTTP_FORBIDDEN, NULL,
                                  "Host header not allowed (DNS-rebinding protection; see "
                                  "--allow-host)");
    /* a transfer coding other than chunked (gzip, "gzip, chunked"): the body
     * cannot be read as sent (RFC 9112 6.1: 501) */
    const char *te = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_TRANSFER_ENCODING);
    if (te && (strcasecmp(te, "chunked") || hs.n_te > 1)) { /* two lines: a list of codings, as "chunked, gzip" */
        char m[160];
        snprintf(m, sizeof m, "Transfer-Encoding %.64s%s is not supported (only chunked)", te,
                 hs.n_te > 1 ? " (and more lines)" : "");
        return reply_simple_error(s, c, url, MHD_HTTP_NOT_IMPLEMENTED, NULL, m);
    }
    bool options = !strcmp(method, "OPTIONS");
    if (!options && !api_key_ok(s, c))
        return reply_simple_error(s, c, url, MHD_HTTP_UNAUTHORIZED, "invalid_api_key",
                                  "invalid API key");
    if (!strcmp(method, "POST")) {
        size_t i = 0, n = sizeof g_routes / sizeof g_routes[0];
        while (i < n && strcmp(url, g_routes[i].path)) i++;
        if (i == n && (!strcmp(url, "/v1/models") || !strcmp(url, "/v1/models/" SRV_MODEL_ID)))
            return reply_405(s, c, url, false);
        if (i == n)
            return reply_simple_error(s, c, url, MHD_HTTP_NOT_FOUND, "unknown_url", "unknown endpoint");
        if (!json_content_type(c))
            return reply_simple_error(s, c, url, MHD_HTTP_UNSUPPORTED_MEDIA_TYPE, NULL,
                                      "Content-Type must be application/json (UTF-8)");
        /* a compressed body would be read as JSON text: refuse it by name (RFC 9110 8.4) */
        const char *enc = hs.ce_bad;
        if (enc) {
            char m[160];
            snprintf(m, sizeof m, "Content-Encoding %.64s is not supported: send the request body uncompressed",
                     enc);
            return reply_simple_error(s, c, url, MHD_HTTP_UNSUPPORTED_MEDIA_TYPE, NULL, m);
        }
        cx->api = g_routes[i].api;
        cx->count = g_routes[i].count;
        /* a body that cannot fit, known from its length. A client waiting for 100 Continue has sent none of
         * it: answered now (the Continue invited the whole upload, then 413). One that claims more than twice
         * the limit (a terabyte was read and dropped until the request deadline, with no reply) is answered
         * now too and the connection closed, though a client still sending may then see a reset instead of
         * the reply. Up to twice the limit the body is drained and then answered (run_post), so an ordinary
         * client reads its 413. A chunked body is counted as it comes. */
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        const unsigned long long cln = cl ? strtoull(cl, NULL, 10) : 0;
        if (cln > SRV_MAX_BODY_BYTES) {
            const char *ex = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_EXPECT);
            if ((ex && strcasestr(ex, "100-continue")) || cln > 2ull * SRV_MAX_BODY_BYTES) {
                srv_error e = {0};
                srv_fail(&e, 413, "request body too large (limit %u bytes)", SRV_MAX_BODY_BYTES);
                return reply_error(s, c, cx->api, &e);
            }
            cx->too_large = true;
        }
    }
    *refused = false;
    return MHD_YES;
}

static enum MHD_Result handler(void *cls, struct MHD_Connection *c, const char *url,
                               const char *method, const char *version, const char *upload_data,
                               size_t *upload_data_size, void **con_cls) {
    srv_server *s = cls;
    conn_ctx *cx = *con_cls;
    if (!cx) {
        cx = xcalloc(1, sizeof *cx);
        cx->s = s;
        *con_cls = cx;
        pthread_mutex_lock(&s->http->mu);
        s->http->n_requests++;
        pthread_mutex_unlock(&s->http->mu);
        bool refused;
        enum MHD_Result r = check_headers(s, c, cx, url, method, version, &refused);
        if (refused) {
            cx->answered = true;
            request_arrived(s, c);
            return r;
        }
        return MHD_YES;
    }
    if (cx->answered) { /* refused at the headers: nothing more to do */
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (*upload_data_size) {
        if (!cx->too_large) {
            if (cx->body.len + *upload_data_size > SRV_MAX_BODY_BYTES) {
                cx->too_large = true;
                ds4_buf_free(&cx->body);
            } else if (ds4_buf_append(&cx->body, upload_data, *upload_data_size)) {
                cx->too_large = true; /* could not hold it */
                ds4_buf_free(&cx->body);
            }
        }
        *upload_data_size = 0;
        return MHD_YES;
    }
    request_arrived(s, c); /* last call: the body (if any) is in */
    if (!strcmp(method, "OPTIONS")) {
        struct MHD_Response *r = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
        add_common(s, r);
        enum MHD_Result ok = MHD_queue_response(c, MHD_HTTP_NO_CONTENT, r);
        MHD_destroy_response(r);
        return ok;
    }
    /* HEAD as GET: libmicrohttpd sends the headers (Content-Length included) without the body */
    if (!strcmp(method, "GET") || !strcmp(method, "HEAD")) {
        if (!strcmp(url, "/v1/models")) {
            char *m = model_json(s);
            size_t n = strlen(m) + 160;
            char *b = xmalloc(n);
            snprintf(b, n, "{\"object\":\"list\",\"data\":[%s],\"has_more\":false,\"first_id\":\"" SRV_MODEL_ID
                           "\",\"last_id\":\"" SRV_MODEL_ID "\"}", m);
            free(m);
            return reply_json(s, c, MHD_HTTP_OK, b, true);
        }
        if (!strcmp(url, "/v1/models/" SRV_MODEL_ID))
            return reply_json(s, c, MHD_HTTP_OK, model_json(s), true);
        if (!strncmp(url, "/v1/models/", 11))
            return reply_simple_error(s, c, url, MHD_HTTP_NOT_FOUND, "model_not_found",
                                      "model not found: this server serves " SRV_MODEL_ID);
    }
    if (!strcmp(method, "POST")) return run_post(s, c, cx, cx->api); /* route checked above */
    for (size_t i = 0; i < sizeof g_routes / sizeof g_routes[0]; i++)
        if (!strcmp(url, g_routes[i].path))
            return reply_405(s, c, url, true);
    if (!strcmp(url, "/v1/models") || !strcmp(url, "/v1/models/" SRV_MODEL_ID))
        return reply_405(s, c, url, false);
    return reply_simple_error(s, c, url, MHD_HTTP_NOT_FOUND, "unknown_url", "unknown endpoint");
}

static void completed(void *cls, struct MHD_Connection *c, void **con_cls,
                      enum MHD_RequestTerminationCode toe) {
    srv_server *s = cls;
    (void)c;
    conn_ctx *cx = *con_cls;
    if (!cx) return;
    if (cx->job) {
        if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK) srv_job_cancel(cx->job);
        srv_job_release(s, cx->job);
    }
    ds4_buf_free(&cx->body);
    free(cx);
    *con_cls = NULL;
    pthread_mutex_lock(&s->http->mu);
    s->http->n_requests--;
    pthread_cond_broadcast(&s->http->cv);
    pthread_mutex_unlock(&s->http->mu);
}

/* ---- connections: request deadline -------------------------------------------- */

/* The key a peer's connections are counted under: its IPv4 address (an
 * IPv4-mapped IPv6 one too), or the /64 prefix of an IPv6 address (one host
 * commonly holds a whole /64, so counting full addresses would cap nothing);
 * 0 for other families. The top bit tells the two apart. */
static uint64_t client_key(const struct sockaddr *a) {
    if (!a) return 0;
    if (a->sa_family == AF_INET) return ((const struct sockaddr_in *)a)->sin_addr.s_addr | (1ull << 63);
    if (a->sa_family == AF_INET6) {
        const uint8_t *b = ((const struct sockaddr_in6 *)a)->sin6_addr.s6_addr;
        static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        uint32_t v4;
        if (!memcmp(b, mapped, 12)) {
            memcpy(&v4, b + 12, 4);
            return v4 | (1ull << 63);
        }
        uint64_t k = 0;
        for (int i = 0; i < 8; i++) k = k << 8 | b[i];
        return (k >> 1) | 1; /* top bit clear, never 0 */
    }
    return 0;
}

static void notify_conn(void *cls, struct MHD_Connection *c, void **socket_context,
                        enum MHD_ConnectionNotificationCode code) {
    srv_http *h = ((srv_server *)cls)->http;
    if (code == MHD_CONNECTION_NOTIFY_STARTED) {
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
        const union MHD_ConnectionInfo *ca = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
        conn_rec *r = xcalloc(1, sizeof *r);
        r->fd = ci ? ci->connect_fd : -1;
        r->client = ca ? client_key(ca->client_addr) : 0;
        r->t_open = srv_now_mono();
        pthread_mutex_lock(&h->mu);
        r->next = h->conns;
        if (h->conns) h->conns->prev = r;
        h->conns = r;
        pthread_mutex_unlock(&h->mu);
        *socket_context = r;
    } else if (code == MHD_CONNECTION_NOTIFY_CLOSED && *socket_context) {
        conn_rec *r = *socket_context;
        pthread_mutex_lock(&h->mu);
        if (r->prev) r->prev->next = r->next;
        else h->conns = r->next;
        if (r->next) r->next->prev = r->prev;
        pthread_mutex_unlock(&h->mu);
        free(r);
        *socket_context = NULL;
    }
}

/* libmicrohttpd's messages (a client that closed mid-request, a malformed
 * request), at most 5 per 10 s: each slow or cut connection of an attack
 * produces one, and the log must not grow with the attack. */
static void mhd_log(void *cls, const char *fmt, va_list ap) {
    srv_http *h = ((srv_server *)cls)->http;
    char line[512];
    vsnprintf(line, sizeof line, fmt, ap);
    line[strcspn(line, "\r\n")] = 0;
    double now = srv_now_mono();
    long quiet = 0;
    bool show;
    pthread_mutex_lock(&h->mu);
    if (now - h->t_mhd_window >= 10.0) {
        quiet = h->n_mhd_quiet;
        h->n_mhd_quiet = 0;
        h->n_mhd_logged = 0;
        h->t_mhd_window = now;
    }
    show = h->n_mhd_logged < 5;
    if (show) h->n_mhd_logged++;
    else h->n_mhd_quiet++;
    pthread_mutex_unlock(&h->mu);
    if (quiet) srv_log("http: %ld more libmicrohttpd messages suppressed", quiet);
    if (show) srv_log("http: %s", line);
}

/* Per-client cap (accept policy, listen thread): one address may hold
 * --max-connections-per-client connections that are still sending their
 * request. At the cap, its oldest such connection open for at least
 * SRV_CAP_GRACE_S is shut down to make room, so a client that completes its
 * request at once is served even while others from its address trickle
 * headers; when all of them are younger (a burst), the new one is refused.
 * Connections whose request is in (queued, streaming) never count. */
#define SRV_CAP_GRACE_S 0.5
/* The whole server's connections (the same rule across clients): at
 * SRV_CONN_LIMIT open ones the oldest still sending its request (past the
 * grace) is shut down for the new one; libmicrohttpd's own limit sits a
 * little above, for the connections being cut. An outside pass filled the
 * old hard limit with idle sockets from 9 addresses (under the per-client
 * cap) and locked every other client out. */
#define SRV_CONN_LIMIT 512u
#define SRV_CONN_LIMIT_MHD (SRV_CONN_LIMIT + 64u)

/* shuts down r's socket (its thread then ends the connection) */
static void cut_conn(conn_rec *r, long *count) {
    shutdown(r->fd, SHUT_RDWR);
    r->cut = true;
    (*count)++;
}

static enum MHD_Result accept_policy(void *cls, const struct sockaddr *addr, socklen_t len) {
    srv_server *s = cls;
    srv_http *h = s->http;
    const int cap = s->cfg.max_conn_per_client;
    const bool sized = addr && ((addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) ||
                                (addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)));
    const uint64_t client = sized ? client_key(addr) : 0;
    double now = srv_now_mono();
    enum MHD_Result ok = MHD_YES;
    pthread_mutex_lock(&h->mu);
    unsigned open = 0;
    int pending = 0;
    conn_rec *oldest = NULL, *oldest_any = NULL;
    for (conn_rec *r = h->conns; r; r = r->next) {
        if (r->cut) continue;
        open++;
        if (r->request_in || r->fd < 0) continue;
        if (!oldest_any || r->t_open < oldest_any->t_open) oldest_any = r;
        if (!client || r->client != client) continue;
        pending++;
        if (!oldest || r->t_open < oldest->t_open) oldest = r;
    }
    if (cap > 0 && client && pending >= cap) {
        if (oldest && now - oldest->t_open >= SRV_CAP_GRACE_S) {
            cut_conn(oldest, &h->n_capped);
            open--;
            if (oldest_any == oldest) oldest_any = NULL;
        } else {
            h->n_capped++;
            ok = MHD_NO;
        }
    }
    if (ok == MHD_YES && open >= SRV_CONN_LIMIT) {
        if (oldest_any && now - oldest_any->t_open >= SRV_CAP_GRACE_S) {
            cut_conn(oldest_any, &h->n_full);
        } else {
            h->n_full++;
            ok = MHD_NO;
        }
    }
    pthread_mutex_unlock(&h->mu);
    return ok;
}

/* Every 250 ms, shuts down the sockets of connections whose request has not
 * fully arrived within --request-timeout of the accept. libmicrohttpd's own
 * timeout restarts on every byte, so a client trickling a header line every
 * few seconds would otherwise hold its connection (and, with enough of them,
 * the connection limit) forever. The connection thread sees the shutdown as
 * a closed peer and ends the connection. */
static void *sweeper_main(void *arg) {
    srv_server *s = arg;
    srv_http *h = s->http;
    double limit = (double)s->cfg.request_timeout_s;
    pthread_mutex_lock(&h->mu);
    while (!h->stop) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 250 * 1000000L;
        if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
        pthread_cond_timedwait(&h->cv, &h->mu, &ts);
        double now = srv_now_mono();
        for (conn_rec *r = h->conns; r && limit > 0; r = r->next) {
            if (r->request_in || r->cut || r->fd < 0 || now - r->t_open < limit) continue;
            shutdown(r->fd, SHUT_RDWR);
            r->cut = true;
            h->n_cut++;
        }
        /* one line per 10 s at most: an attack must not flood the log */
        if ((h->n_cut || h->n_capped || h->n_full) && now - h->t_cut_log >= 10.0) {
            if (h->n_cut)
                srv_log("http: closed %ld connection(s) that did not send a complete request "
                        "within %d s", h->n_cut, s->cfg.request_timeout_s);
            if (h->n_capped)
                srv_log("http: closed or refused %ld connection(s) over the cap of %d per client "
                        "still sending a request", h->n_capped, s->cfg.max_conn_per_client);
            if (h->n_full)
                srv_log("http: closed or refused %ld connection(s) at the server's limit of %u connections "
                        "(the oldest still sending a request makes room)", h->n_full, SRV_CONN_LIMIT);
            h->n_cut = h->n_capped = h->n_full = 0;
            h->t_cut_log = now;
        }
    }
    pthread_mutex_unlock(&h->mu);
    return NULL;
}

/* The listening socket, bound here rather than by libmicrohttpd so that
 * only SO_REUSEADDR is set (a restart may bind over TIME_WAIT leftovers):
 * never SO_REUSEPORT, with which a second server on a busy port would start
 * and the kernel would split connections between the two. Returns the fd,
 * or -1 with err set. */
static int listen_on(srv_server *s, ds4_err *err) {
    struct sockaddr_in addr = {0};
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)s->cfg.port);
    const char *host = s->cfg.host;
    if (!strcmp(host, "localhost")) host = "127.0.0.1";
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        ds4_err_set(err, DS4_E_ARG, "--host %s: not an IPv4 address", s->cfg.host);
        return -1;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        ds4_err_set(err, DS4_E_IO, "cannot create a socket: %s", strerror(errno));
        return -1;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(fd, 128) != 0) {
        int e = errno;
        close(fd);
        if (e == EADDRINUSE)
            ds4_err_set(err, DS4_E_IO,
                        "cannot listen on %s:%d: address in use (another server is listening "
                        "there; pick another --port)", s->cfg.host, s->cfg.port);
        else
            ds4_err_set(err, DS4_E_IO, "cannot listen on %s:%d: %s", s->cfg.host, s->cfg.port,
                        strerror(e));
        return -1;
    }
    socklen_t len = sizeof addr;
    if (getsockname(fd, (struct sockaddr *)&addr, &len) == 0) s->cfg.port = ntohs(addr.sin_port);
    return fd;
}

int srv_http_listen(srv_server *s, ds4_err *err) {
    int lfd = listen_on(s, err);
    if (lfd < 0) return err ? err->code : DS4_E_IO;
    srv_http *h = xcalloc(1, sizeof *h);
    pthread_mutex_init(&h->mu, NULL);
    pthread_cond_init(&h->cv, NULL);
    h->listen_fd = lfd;
    s->http = h;
    return 0;
}

/* URL unescaping (%XX) for libmicrohttpd, except that %00 stays as it is:
 * the endpoints compare the path as a C string, so a decoded NUL cut
 * "/v1/chat/completions%00junk" to an endpoint's path (a proxy's path rules
 * would see another path than ds4 serves); with it kept, that path is a 404. */
static size_t unescape(void *cls, struct MHD_Connection *c, char *str) {
    (void)cls, (void)c;
    const size_t n = ds4_percent_decode(str, str, strlen(str), 1);
    str[n] = '\0';
    return n;
}

int srv_http_start(srv_server *s, ds4_err *err) {
    srv_http *h = s->http;
    if (!h) return ds4_err_set(err, DS4_E_INTERNAL, "srv_http_start before srv_http_listen");
    /* MHD_USE_ITC: MHD_quiesce_daemon (shutdown drain) needs it. The daemon
     * owns the listening socket from here on. */
    int lfd = h->listen_fd;
    h->listen_fd = -1;
    h->d = MHD_start_daemon(
        MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL |
            MHD_USE_ITC | MHD_USE_ERROR_LOG,
        0, accept_policy, s, handler, s, MHD_OPTION_EXTERNAL_LOGGER, mhd_log, s,
        MHD_OPTION_LISTEN_SOCKET, (MHD_socket)lfd, MHD_OPTION_UNESCAPE_CALLBACK, unescape, NULL,
        MHD_OPTION_NOTIFY_COMPLETED, completed, s, MHD_OPTION_NOTIFY_CONNECTION, notify_conn, s,
        MHD_OPTION_CONNECTION_TIMEOUT, 10u, MHD_OPTION_CONNECTION_LIMIT, SRV_CONN_LIMIT_MHD,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(128 * 1024), MHD_OPTION_END);
    if (!h->d)
        return ds4_err_set(err, DS4_E_IO, "cannot start the HTTP daemon on %s:%d: %s",
                           s->cfg.host, s->cfg.port, strerror(errno));
    if (pthread_create(&h->sweeper, NULL, sweeper_main, s))
        return ds4_err_set(err, DS4_E_INTERNAL, "cannot start the HTTP deadline thread");
    h->sweeper_started = true;
    return 0;
}

/* Closes the listener and waits up to SRV_DRAIN_S for the requests that
 * reached the handler to complete (their last bytes are written by their
 * own connection threads). */
static void drain(srv_server *s) {
    srv_http *h = s->http;
    MHD_socket lfd = MHD_quiesce_daemon(h->d);
    if (lfd != MHD_INVALID_SOCKET) close(lfd);
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += (time_t)SRV_DRAIN_S;
    pthread_mutex_lock(&h->mu);
    while (h->n_requests > 0 && pthread_cond_timedwait(&h->cv, &h->mu, &until) == 0) {
    }
    int left = h->n_requests;
    pthread_mutex_unlock(&h->mu);
    if (left > 0)
        srv_log("ds4-server: %d request(s) still open after %.0f s; closing them", left, SRV_DRAIN_S);
}

void srv_http_stop(srv_server *s) {
    srv_http *h = s->http;
    if (!h) return;
    if (h->d) {
        drain(s);
        MHD_stop_daemon(h->d); /* every connection reported CLOSED: conns is empty */
    }
    if (h->sweeper_started) {
        pthread_mutex_lock(&h->mu);
        h->stop = true;
        pthread_cond_broadcast(&h->cv);
        pthread_mutex_unlock(&h->mu);
        pthread_join(h->sweeper, NULL);
    }
    if (h->listen_fd >= 0) close(h->listen_fd);
    pthread_mutex_destroy(&h->mu);
    pthread_cond_destroy(&h->cv);
    free(h);
    s->http = NULL;
}
