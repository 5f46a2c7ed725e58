/* remote.c - the proxy backend of a remote part and the worker loop that
 * serves it (remote.h), over TCP channels. */
#include "remote.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "gguf.h"
#include "model.h"
#include "quant.h"

/* ------------------------------------------------------------ channels */

struct ds4_chan {
    int fd;
    int rank;
};

#define HELLO_MAGIC 0x52345344u /* "DS4R" */
/* Both ends must be the same build: the structs cross the channel as bytes. */
#define PROTO_VERSION ((uint32_t)(1000 + sizeof(ds4_model) + 7 * sizeof(ds4_layer) + 3 * sizeof(ds4_attention_args)))

typedef struct {
    uint32_t magic, version;
    int32_t rank, pad;
} hello;

static double now_s(void);

/* Moves n bytes; with a deadline (monotonic seconds, 0 = no limit) a read
 * waits at most until then for the bytes to come and a write for the peer
 * to take them (a stopped peer's kernel keeps the connection open with a
 * zero window: without a deadline a send would wait forever): -1 on a
 * closed or failed socket, -2 when the deadline passed. */
static int io_until(int fd, void *p, size_t n, bool wr, double deadline) {
    unsigned char *b = p;
    while (n) {
        if (deadline > 0) {
            double left = deadline - now_s();
            struct pollfd pf = {.fd = fd, .events = wr ? POLLOUT : POLLIN};
            int pr = left > 0 ? poll(&pf, 1, (int)(left * 1000) + 1) : 0;
            if (pr < 0 && errno == EINTR) continue;
            if (pr == 0) return -2;
            if (pr < 0) return -1;
        }
        ssize_t k = wr ? send(fd, b, n, MSG_NOSIGNAL | (deadline > 0 ? MSG_DONTWAIT : 0)) : recv(fd, b, n, 0);
        if (k < 0 && (errno == EINTR || (deadline > 0 && (errno == EAGAIN || errno == EWOULDBLOCK)))) continue;
        if (k <= 0) return -1;
        b += k;
        n -= (size_t)k;
    }
    return 0;
}
static int io_all(int fd, void *p, size_t n, bool wr) { return io_until(fd, p, n, wr, 0); }
static int ch_send(ds4_chan *c, const void *p, size_t n) { return n ? io_all(c->fd, (void *)(uintptr_t)p, n, true) : 0; }
static int ch_recv(ds4_chan *c, void *p, size_t n) { return n ? io_all(c->fd, p, n, false) : 0; }

static int split_hostport(const char *hp, char *host, size_t cap, const char **port, ds4_err *err) {
    const char *colon = hp ? strrchr(hp, ':') : NULL;
    if (!colon || colon == hp || !colon[1] || (size_t)(colon - hp) >= cap)
        return ds4_err_set(err, DS4_E_ARG, "rendezvous '%s': expected HOST:PORT", hp ? hp : "");
    memcpy(host, hp, (size_t)(colon - hp));
    host[colon - hp] = 0;
    size_t hl = (size_t)(colon - hp);
    if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') { /* [IPv6]:port */
        memmove(host, host + 1, hl - 2);
        host[hl - 2] = 0;
    }
    *port = colon + 1;
    return 0;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* No Nagle delay for the small messages; keepalive probes so that a host
 * that vanished is noticed within about a minute. */
static void tune(int fd) {
    int one = 1, idle = 30, intvl = 10, cnt = 3;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);
}

/* True when the peer of a registered, idle channel closed it (nothing is
 * sent on it before the rendezvous ends, so readable means closed). */
static bool chan_hung_up(const ds4_chan *c) {
    struct pollfd pf = {.fd = c->fd, .events = POLLIN | POLLRDHUP};
    if (poll(&pf, 1, 0) <= 0) return false;
    if (pf.revents & (POLLRDHUP | POLLHUP | POLLERR)) return true;
    char x;
    return recv(c->fd, &x, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
}

/* A connection of the rendezvous that has not sent its whole hello yet. */
typedef struct {
    int fd;
    double deadline; /* a hello is 16 bytes: one that takes longer is not from a worker */
    size_t got;
    hello h;
    uint64_t seq; /* accept order: complete hellos are taken in it, the oldest goes first in a flood */
} pending_hello;

#define PENDING_MAX 32

/* A complete hello on connection c: registers the worker (1), refuses it
 * (0: closed), or fails the rendezvous (-1: out of memory). */
static int take_hello(int c, hello h, int n_workers, ds4_chan **chans, int *got, ds4_err *err) {
    if (h.magic != HELLO_MAGIC) { /* not a worker: ignore it */
        close(c);
        return 0;
    }
    hello ack = {HELLO_MAGIC, PROTO_VERSION, 0, 0};
    if (h.version == PROTO_VERSION && h.rank >= 1 && h.rank <= n_workers && chans[h.rank - 1] &&
        chan_hung_up(chans[h.rank - 1])) { /* that rank's worker went away (restarted): the new one takes over */
        fprintf(stderr, "ds4: rendezvous: rank %d connected again (its first connection closed)\n", h.rank);
        ds4_chan_close(chans[h.rank - 1]);
        chans[h.rank - 1] = NULL;
        (*got)--;
    }
    if (h.version != PROTO_VERSION || h.rank < 1 || h.rank > n_workers || chans[h.rank - 1]) {
        ack.rank = -1;
        io_until(c, &ack, sizeof ack, true, now_s() + 5);
        close(c);
        if (h.version != PROTO_VERSION)
            fprintf(stderr, "ds4: rendezvous: refused a worker of another ds4 build (protocol %u, expected %u)\n",
                    h.version, PROTO_VERSION);
        else if (h.rank < 1 || h.rank > n_workers)
            fprintf(stderr, "ds4: rendezvous: refused a worker of rank %d (ranks 1..%d)\n", h.rank, n_workers);
        else
            fprintf(stderr, "ds4: rendezvous: refused a second worker of rank %d\n", h.rank);
        return 0;
    }
    if (io_until(c, &ack, sizeof ack, true, now_s() + 5)) {
        close(c);
        return 0;
    }
    ds4_chan *ch = calloc(1, sizeof *ch);
    if (!ch) {
        close(c);
        ds4_err_set(err, DS4_E_NOMEM, "out of memory");
        return -1;
    }
    ch->fd = c;
    ch->rank = h.rank;
    chans[h.rank - 1] = ch;
    (*got)++;
    return 1;
}

/* Rank 0's side: listens on hostport until n_workers workers of distinct
 * ranks have said hello. Connections are served side by side (up to
 * PENDING_MAX waiting for their hello at once, the oldest dropped past
 * that), so idle or slow connections to the port cannot hold up the
 * workers behind them. */
int ds4_chan_listen(const char *hostport, int n_workers, int timeout_s, ds4_chan **chans, ds4_err *err) {
    char host[256];
    const char *port;
    int rc = split_hostport(hostport, host, sizeof host, &port, err);
    if (rc) return rc;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *ai = NULL;
    int gr = getaddrinfo(host, port, &hints, &ai);
    if (gr) return ds4_err_set(err, DS4_E_ARG, "rendezvous %s: %s", hostport, gai_strerror(gr));
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    if (fd >= 0) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (fd < 0 || bind(fd, ai->ai_addr, ai->ai_addrlen) || listen(fd, n_workers + PENDING_MAX)) {
        rc = ds4_err_set(err, DS4_E_IO, "rendezvous %s: cannot listen: %s", hostport, strerror(errno));
        freeaddrinfo(ai);
        if (fd >= 0) close(fd);
        return rc;
    }
    freeaddrinfo(ai);
    for (int i = 0; i < n_workers; i++) chans[i] = NULL;
    const double t_end = now_s() + timeout_s;
    pending_hello pd[PENDING_MAX];
    int np = 0, got = 0;
    uint64_t seq = 0;
    while (got < n_workers && !rc) {
        const double now = now_s();
        if (now >= t_end) {
            rc = ds4_err_set(err, DS4_E_IO, "rendezvous %s: %d of %d workers connected within %d s", hostport, got,
                             n_workers, timeout_s);
            break;
        }
        double next = t_end;
        for (int i = np - 1; i >= 0; i--) {
            if (pd[i].deadline <= now) { /* too slow for a hello */
                close(pd[i].fd);
                pd[i] = pd[--np];
            } else if (pd[i].deadline < next)
                next = pd[i].deadline;
        }
        struct pollfd pf[1 + PENDING_MAX];
        pf[0] = (struct pollfd){.fd = fd, .events = POLLIN};
        for (int i = 0; i < np; i++) pf[1 + i] = (struct pollfd){.fd = pd[i].fd, .events = POLLIN};
        const int n_pf = 1 + np;
        const int pr = poll(pf, (nfds_t)n_pf, (int)((next - now) * 1000) + 1);
        if (pr < 0 && errno != EINTR) {
            rc = ds4_err_set(err, DS4_E_IO, "rendezvous %s: poll: %s", hostport, strerror(errno));
            break;
        }
        if (pr <= 0) continue;
        /* from the last: a closed entry takes the last one's place, already served */
        for (int i = n_pf - 2; i >= 0; i--) {
            if (!pf[1 + i].revents) continue;
            const ssize_t k = recv(pd[i].fd, (char *)&pd[i].h + pd[i].got, sizeof(hello) - pd[i].got, MSG_DONTWAIT);
            if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) continue;
            if (k <= 0) { /* closed or failed before its hello */
                close(pd[i].fd);
                pd[i] = pd[--np];
                continue;
            }
            pd[i].got += (size_t)k;
        }
        /* the complete hellos in accept order (of two workers claiming one
         * rank the first to connect keeps it, as before) */
        for (;;) {
            int first = -1;
            for (int i = 0; i < np; i++)
                if (pd[i].got == sizeof(hello) && (first < 0 || pd[i].seq < pd[first].seq)) first = i;
            if (first < 0 || rc) break;
            const pending_hello done = pd[first];
            pd[first] = pd[--np];
            if (take_hello(done.fd, done.h, n_workers, chans, &got, err) < 0) rc = DS4_E_NOMEM;
        }
        if (!rc && (pf[0].revents & POLLIN)) {
            const int c = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
            if (c >= 0) {
                tune(c);
                if (np == PENDING_MAX) { /* a flood of idle connections: the oldest goes */
                    int old = 0;
                    for (int i = 1; i < np; i++)
                        if (pd[i].seq < pd[old].seq) old = i;
                    close(pd[old].fd);
                    pd[old] = pd[--np];
                }
                const double t = now_s(); /* poll may have slept long since `now` */
                pd[np++] = (pending_hello){.fd = c, .deadline = t + 5 < t_end ? t + 5 : t_end, .seq = seq++};
            }
        }
    }
    for (int i = 0; i < np; i++) close(pd[i].fd);
    close(fd);
    if (got < n_workers) {
        for (int i = 0; i < n_workers; i++) ds4_chan_close(chans[i]), chans[i] = NULL;
        return rc ? rc : ds4_err_set(err, DS4_E_IO, "rendezvous failed");
    }
    return 0;
}

int ds4_chan_connect(const char *hostport, int rank, int timeout_s, ds4_chan **out, ds4_err *err) {
    char host[256];
    const char *port;
    *out = NULL;
    int rc = split_hostport(hostport, host, sizeof host, &port, err);
    if (rc) return rc;
    const double t_end = now_s() + timeout_s;
    for (;;) {
        struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai = NULL;
        int gr = getaddrinfo(host, port, &hints, &ai);
        if (gr) return ds4_err_set(err, DS4_E_ARG, "rendezvous %s: %s", hostport, gai_strerror(gr));
        /* every address of the name in turn (a host may resolve to an IPv6
         * address rank 0 does not listen on before the IPv4 one it does) */
        int fd = -1, ok = 0;
        for (struct addrinfo *a = ai; a && !ok; a = a->ai_next) {
            if (fd >= 0) close(fd);
            fd = socket(a->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
            ok = fd >= 0 && connect(fd, a->ai_addr, a->ai_addrlen) == 0;
        }
        freeaddrinfo(ai);
        if (ok) {
            tune(fd);
            hello h = {HELLO_MAGIC, PROTO_VERSION, rank, 0}, ack = {0};
            if (io_all(fd, &h, sizeof h, true) || io_until(fd, &ack, sizeof ack, false, now_s() + 60) ||
                ack.magic != HELLO_MAGIC || ack.rank != 0 || ack.version != PROTO_VERSION) {
                close(fd);
                return ds4_err_set(err, DS4_E_IO, "rendezvous %s: rank 0 refused rank %d (%s)", hostport, rank,
                                   ack.magic == HELLO_MAGIC && ack.version != PROTO_VERSION
                                       ? "a different ds4 build"
                                       : "duplicate or out-of-range rank, or a different ds4 build");
            }
            ds4_chan *c = calloc(1, sizeof *c);
            if (!c) {
                close(fd);
                return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
            }
            c->fd = fd;
            c->rank = rank;
            *out = c;
            return 0;
        }
        if (fd >= 0) close(fd);
        if (now_s() > t_end)
            return ds4_err_set(err, DS4_E_IO, "rendezvous %s: cannot connect within %d s: %s", hostport, timeout_s,
                               strerror(errno));
        usleep(200 * 1000);
    }
}

void ds4_chan_close(ds4_chan *c) {
    if (!c) return;
    close(c->fd);
    free(c);
}

/* ------------------------------------------------------------ protocol */

enum {
    OP_BIND = 1, OP_UNBIND, OP_ROW_TYPE, OP_RESERVE, OP_ALLOC, OP_FREE, OP_UPLOAD, OP_DOWNLOAD, OP_COPY,
    OP_COPY_MANY, OP_STEP_BEGIN, OP_STEP_END, OP_FORGET, OP_ARGMAX, OP_PROF_MARK, OP_PROF_READ, OP_BANDWIDTH,
    OP_DESCRIBE, OP_STAGE, OP_BYE
};

typedef struct {
    uint32_t op, k;           /* op, and a small argument (stage kind, binding) */
    uint64_t a, b, c, len;    /* arguments; len payload bytes follow */
} req;

typedef struct {
    int32_t rc;
    uint32_t msg_len;         /* error message bytes follow, then len payload bytes */
    uint64_t r0, len;
} rep;

/* The stages: argument size and the fields that point at host structs of
 * the bound description (rewritten to the worker's copies). */
enum { ST_EMBED, ST_HC_PRE, ST_ATTN_PROJECT, ST_COMPRESS, ST_INDEXER, ST_ATTENTION, ST_KV_STORE, ST_HC_POST,
       ST_MOE_ROUTE, ST_MOE_EXPERTS, ST_HEAD, ST_MTP_EMBED, ST_N };
#define P(T, f) offsetof(T, f)
static const struct {
    size_t size;
    int n;
    size_t off[5];
} stage_desc[ST_N] = {
    [ST_EMBED] = {sizeof(ds4_embed_args), 1, {P(ds4_embed_args, m)}},
    [ST_HC_PRE] = {sizeof(ds4_hc_pre_args), 2, {P(ds4_hc_pre_args, m), P(ds4_hc_pre_args, fn)}},
    [ST_ATTN_PROJECT] = {sizeof(ds4_attn_project_args), 3,
                         {P(ds4_attn_project_args, m), P(ds4_attn_project_args, l), P(ds4_attn_project_args, rope)}},
    [ST_COMPRESS] = {sizeof(ds4_compress_args), 5,
                     {P(ds4_compress_args, m), P(ds4_compress_args, rope), P(ds4_compress_args, ape),
                      P(ds4_compress_args, wkv), P(ds4_compress_args, wgate)}},
    [ST_INDEXER] = {sizeof(ds4_indexer_args), 3,
                    {P(ds4_indexer_args, m), P(ds4_indexer_args, l), P(ds4_indexer_args, rope)}},
    [ST_ATTENTION] = {sizeof(ds4_attention_args), 3,
                      {P(ds4_attention_args, m), P(ds4_attention_args, l), P(ds4_attention_args, rope)}},
    [ST_KV_STORE] = {sizeof(ds4_kv_store_args), 1, {P(ds4_kv_store_args, m)}},
    [ST_HC_POST] = {sizeof(ds4_hc_post_args), 1, {P(ds4_hc_post_args, m)}},
    [ST_MOE_ROUTE] = {sizeof(ds4_moe_route_args), 2, {P(ds4_moe_route_args, m), P(ds4_moe_route_args, l)}},
    [ST_MOE_EXPERTS] = {sizeof(ds4_moe_experts_args), 2, {P(ds4_moe_experts_args, m), P(ds4_moe_experts_args, l)}},
    [ST_HEAD] = {sizeof(ds4_head_args), 1, {P(ds4_head_args, m)}},
    [ST_MTP_EMBED] = {sizeof(ds4_mtp_embed_args), 1, {P(ds4_mtp_embed_args, m)}},
};
#undef P
#define MAX_ARGS 512
_Static_assert(sizeof(ds4_compress_args) <= MAX_ARGS && sizeof(ds4_attention_args) <= MAX_ARGS &&
                   sizeof(ds4_hc_pre_args) <= MAX_ARGS && sizeof(ds4_moe_experts_args) <= MAX_ARGS,
               "stage arguments fit a message");

/* The data pointers of a bound description, in ds4_model_visit_all order. */
typedef struct {
    uint64_t *v;
    size_t n, cap;
    int fail;
} ptr_list;
static int collect_weight(void *u, ds4_weight *w) {
    ptr_list *l = u;
    if (l->n == l->cap) {
        size_t nc = l->cap ? 2 * l->cap : 256;
        uint64_t *nv = realloc(l->v, nc * sizeof *nv);
        if (!nv) return l->fail = DS4_E_NOMEM;
        l->v = nv;
        l->cap = nc;
    }
    l->v[l->n++] = (uint64_t)(uintptr_t)w->data;
    return 0;
}
static int collect_vec(void *u, void **p, size_t bytes) {
    (void)bytes;
    ds4_weight w = {.data = *p};
    return collect_weight(u, &w);
}
typedef struct {
    const uint64_t *v;
    size_t n, i;
} ptr_feed;
static int assign_weight(void *u, ds4_weight *w) {
    ptr_feed *f = u;
    if (f->i >= f->n) return DS4_E_INTERNAL;
    w->data = (const void *)(uintptr_t)f->v[f->i++];
    return 0;
}
static int assign_vec(void *u, void **p, size_t bytes) {
    (void)bytes;
    ptr_feed *f = u;
    if (f->i >= f->n) return DS4_E_INTERNAL;
    *p = (void *)(uintptr_t)f->v[f->i++];
    return 0;
}

/* ------------------------------------------------------------ proxy backend */

typedef struct rp_bind {
    ds4_model *pm;            /* rank 0's description: host's mirror with the worker's data pointers */
    uint64_t wm, wl;          /* the worker's description and its layers array */
} rp_bind;

typedef struct rp_ctx {
    ds4_chan *ch;
    char *path, *mtp_path, *synthetic;
    uint64_t seed;
    uint8_t fp[32];
    double timeout_s;         /* replies other than the bind's */
    rp_bind b[2];             /* main part, MTP */
    int failed;
    char why[160];            /* what failed, once failed */
    char name[32];
} rp_ctx;

static int rp_lost(rp_ctx *r, ds4_err *err) {
    if (!r->failed) snprintf(r->why, sizeof r->why, "rank %d: the connection to the worker was lost", r->ch->rank);
    r->failed = 1;
    return ds4_err_set(err, DS4_E_BACKEND, "%s", r->why);
}

/* The worker missed a deadline: lost, saying which (first failure wins). */
static int rp_timed_out(rp_ctx *r, const char *what, double secs, ds4_err *err) {
    if (!r->failed)
        snprintf(r->why, sizeof r->why, "rank %d: the worker %s within %.0f s; the connection to the worker was lost",
                 r->ch->rank, what, secs);
    r->failed = 1;
    return rp_lost(r, err);
}

/* backend.h `lost` */
static int rp_lost_q(void *ctx, ds4_err *err) {
    rp_ctx *r = ctx;
    if (!r->failed) return 0;
    ds4_err_set(err, DS4_E_BACKEND, "%s", r->why);
    return 1;
}

/* Sends a request (and its payload); when reply is non-NULL waits for the
 * reply, reads its message into err and its payload into out (up to cap;
 * more is an error). */
/* How long a reply may take: binding loads the worker's part of the model
 * from its disk; any other op is at most a prefill chunk. Past it the worker
 * counts as lost (a stopped or wedged process; a vanished host is caught
 * sooner by the keepalive probes). */
#define RP_BIND_TIMEOUT_S 3600.0
#define RP_REPLY_TIMEOUT_S 600.0

static int rp_call(rp_ctx *r, req q, const void *payload, rep *reply, void *out, size_t cap, ds4_err *err) {
    if (r->failed) return ds4_err_set(err, DS4_E_BACKEND, "%s", r->why);
    int fd = r->ch->fd, io;
    /* the request: the worker must take it within the reply limit too (a
     * stopped worker's zero window would hold a send forever) */
    const double sdl = now_s() + r->timeout_s;
    if ((io = io_until(fd, &q, sizeof q, true, sdl)) || (q.len && (io = io_until(fd, (void *)(uintptr_t)payload, q.len,
                                                                             true, sdl))))
        return io == -2 ? rp_timed_out(r, "took no request data", r->timeout_s, err) : rp_lost(r, err);
    if (!reply) return 0;
    const double wait = q.op == OP_BIND ? (r->timeout_s > RP_BIND_TIMEOUT_S ? r->timeout_s : RP_BIND_TIMEOUT_S)
                                        : r->timeout_s;
    const double dl = now_s() + wait;
#define RECV(p, n)                                                                                         \
    do {                                                                                                   \
        if ((n) && (io = io_until(fd, (p), (n), false, dl)))                                               \
            return io == -2 ? rp_timed_out(r, "did not answer", wait, err) : rp_lost(r, err);              \
    } while (0)
    RECV(reply, sizeof *reply);
    char msg[512];
    /* a worker's status is 0 or a negative DS4_E code */
    if (reply->msg_len > (1u << 16) || reply->len > cap || reply->rc > 0 || reply->rc < DS4_E_BACKEND)
        return rp_lost(r, err); /* not a worker's reply */
    size_t ml = reply->msg_len < sizeof msg ? reply->msg_len : sizeof msg - 1;
    RECV(msg, ml);
    for (size_t i = ml; i < reply->msg_len; i++) { /* a longer message than we keep */
        char c;
        RECV(&c, 1);
    }
    msg[ml] = 0;
    /* a worker's text goes into logs and API errors: no control bytes (a
     * newline would forge a log line, an escape drive the terminal) */
    for (size_t i = 0; i < ml; i++)
        if ((unsigned char)msg[i] < 0x20 || msg[i] == 0x7f) msg[i] = '?';
    RECV(out, reply->len);
#undef RECV
    if (reply->rc) return ds4_err_set(err, reply->rc, "rank %d: %s", r->ch->rank, msg);
    return 0;
}

static uint64_t rewrite(const rp_ctx *r, const void *p) {
    uintptr_t x = (uintptr_t)p;
    for (int k = 0; k < 2; k++) {
        const ds4_model *pm = r->b[k].pm;
        if (!pm) continue;
        if (x >= (uintptr_t)pm && x < (uintptr_t)(pm + 1)) return r->b[k].wm + (x - (uintptr_t)pm);
        uintptr_t l0 = (uintptr_t)pm->layers, l1 = (uintptr_t)(pm->layers + pm->hp.n_layer);
        if (x >= l0 && x < l1) return r->b[k].wl + (x - l0);
    }
    return x;
}

static int rp_stage(void *ctx, int kind, const void *args) {
    rp_ctx *r = ctx;
    unsigned char buf[MAX_ARGS];
    memcpy(buf, args, stage_desc[kind].size);
    for (int i = 0; i < stage_desc[kind].n; i++) {
        const void *p;
        memcpy(&p, buf + stage_desc[kind].off[i], sizeof p);
        uint64_t w = rewrite(r, p);
        void *wp = (void *)(uintptr_t)w;
        memcpy(buf + stage_desc[kind].off[i], &wp, sizeof wp);
    }
    req q = {.op = OP_STAGE, .k = (uint32_t)kind, .len = stage_desc[kind].size};
    return rp_call(r, q, buf, NULL, NULL, 0, NULL) ? DS4_E_BACKEND : 0;
}
#define RP_STAGE(fn, T, K) \
    static int fn(void *ctx, const T *a) { return rp_stage(ctx, K, a); }
RP_STAGE(rp_embed, ds4_embed_args, ST_EMBED)
RP_STAGE(rp_hc_pre, ds4_hc_pre_args, ST_HC_PRE)
RP_STAGE(rp_attn_project, ds4_attn_project_args, ST_ATTN_PROJECT)
RP_STAGE(rp_compress, ds4_compress_args, ST_COMPRESS)
RP_STAGE(rp_indexer, ds4_indexer_args, ST_INDEXER)
RP_STAGE(rp_attention, ds4_attention_args, ST_ATTENTION)
RP_STAGE(rp_kv_store, ds4_kv_store_args, ST_KV_STORE)
RP_STAGE(rp_hc_post, ds4_hc_post_args, ST_HC_POST)
RP_STAGE(rp_moe_route, ds4_moe_route_args, ST_MOE_ROUTE)
RP_STAGE(rp_moe_experts, ds4_moe_experts_args, ST_MOE_EXPERTS)
RP_STAGE(rp_head, ds4_head_args, ST_HEAD)
RP_STAGE(rp_mtp_embed, ds4_mtp_embed_args, ST_MTP_EMBED)
#undef RP_STAGE

static void rp_destroy(void *ctx) {
    rp_ctx *r = ctx;
    if (!r) return;
    if (!r->failed) {
        req q = {.op = OP_BYE};
        rp_call(r, q, NULL, NULL, NULL, 0, NULL);
    }
    for (int k = 0; k < 2; k++) ds4_model_mirror_free(r->b[k].pm);
    ds4_chan_close(r->ch);
    free(r->path);
    free(r->mtp_path);
    free(r->synthetic);
    free(r);
}

static int rp_check_model(void *ctx, const ds4_model *m, ds4_err *err) {
    (void)ctx, (void)m, (void)err;
    return 0; /* the worker's backend checks its part when it binds it */
}

/* What binds: blocks [l0, l1), the embedding, the head, or the MTP block. */
typedef struct {
    int32_t l0, l1, first, last, mtp, synthetic;
    uint64_t seed;
    uint32_t path_len, mtp_len, syn_len, pad;
} bind_req;

static int rp_bind_model(void *ctx, const ds4_model *host, const ds4_bind_opts *o, ds4_model **bound, ds4_err *err) {
    rp_ctx *r = ctx;
    const int mtp = host->mtp_e_proj.n_in > 0, k = mtp ? 1 : 0;
    if (r->b[k].pm) return ds4_err_set(err, DS4_E_ARG, "rank %d: a %s model is bound already", r->ch->rank, mtp ? "MTP" : "main");
    bind_req b = {.l0 = -1, .first = host->tok_embd.n_in > 0, .last = host->output.n_in > 0, .mtp = mtp,
                  .synthetic = o->synthetic, .seed = o->seed};
    for (int il = 0; il < host->hp.n_layer; il++)
        if (host->layers[il].gate_inp.n_in > 0) {
            if (b.l0 < 0) b.l0 = il;
            b.l1 = il + 1;
        }
    if (b.l0 < 0) return ds4_err_set(err, DS4_E_ARG, "rank %d: a part without blocks", r->ch->rank);
    const char *path = r->path ? r->path : "", *mp = r->mtp_path ? r->mtp_path : "", *sy = r->synthetic ? r->synthetic : "";
    b.path_len = (uint32_t)strlen(path);
    b.mtp_len = (uint32_t)strlen(mp);
    b.syn_len = (uint32_t)strlen(sy);
    size_t pl = sizeof b + b.path_len + b.mtp_len + b.syn_len;
    unsigned char *pay = malloc(pl);
    if (!pay) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    memcpy(pay, &b, sizeof b);
    memcpy(pay + sizeof b, path, b.path_len);
    memcpy(pay + sizeof b + b.path_len, mp, b.mtp_len);
    memcpy(pay + sizeof b + b.path_len + b.mtp_len, sy, b.syn_len);
    req q = {.op = OP_BIND, .len = pl};
    rep rp;
    /* reply: r0 = the worker's model, payload = its layers array address, count, then the pointers */
    size_t cap = 1 << 24;
    uint64_t *v = malloc(cap);
    if (!v) {
        free(pay);
        return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    }
    if (o->progress) o->progress(o->progress_user, 0, 1);
    int rc = rp_call(r, q, pay, &rp, v, cap, err);
    free(pay);
    if (rc) {
        free(v);
        return rc;
    }
    ds4_model *pm = ds4_model_mirror(host);
    if (!pm || rp.len < 6 * sizeof(uint64_t)) {
        free(v);
        ds4_model_mirror_free(pm);
        return pm ? rp_lost(r, err) : ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    }
    if (rp.len < 6 * sizeof(uint64_t) || (!mtp && memcmp(v + 2, r->fp, 32))) {
        free(v);
        ds4_model_mirror_free(pm);
        return ds4_err_set(err, DS4_E_MODEL, "rank %d: the worker's model is not rank 0's (their files differ in "
                           "the header or in samples of the tensors; give the worker the same file with -m)",
                           r->ch->rank);
    }
    ptr_feed f = {.v = v + 6, .n = (size_t)v[1]};
    ds4_model_visit vis = {assign_weight, assign_vec, &f};
    if (f.n != rp.len / sizeof(uint64_t) - 6 || ds4_model_visit_all(pm, &vis) || f.i != f.n) {
        free(v);
        ds4_model_mirror_free(pm);
        return ds4_err_set(err, DS4_E_INTERNAL, "rank %d: the worker's part does not match rank 0's (%zu pointers)",
                           r->ch->rank, f.n);
    }
    r->b[k] = (rp_bind){.pm = pm, .wm = rp.r0, .wl = v[0]};
    free(v);
    if (o->progress) o->progress(o->progress_user, 1, 1);
    *bound = pm;
    return 0;
}

static int bind_index(const rp_ctx *r, const ds4_model *m) { return m && m == r->b[1].pm ? 1 : 0; }

static void rp_unbind_model(void *ctx, ds4_model *bound) {
    rp_ctx *r = ctx;
    int k = bind_index(r, bound);
    if (r->b[k].pm != bound) return;
    req q = {.op = OP_UNBIND, .k = (uint32_t)k};
    rep rp;
    rp_call(r, q, NULL, &rp, NULL, 0, NULL);
    ds4_model_mirror_free(r->b[k].pm);
    r->b[k].pm = NULL;
}

static int rp_kv_row_type(void *ctx, ds4_numerics num) {
    rp_ctx *r = ctx;
    req q = {.op = OP_ROW_TYPE, .a = (uint64_t)num.fp8_kv | (uint64_t)num.fp4_indexer << 1 |
                                     (uint64_t)num.f16_cache << 2 | (uint64_t)num.act_quant << 3};
    rep rp;
    if (rp_call(r, q, NULL, &rp, NULL, 0, NULL)) return DS4_TYPE_F32; /* the caller asks `lost` */
    if (rp.r0 != DS4_TYPE_F32 && rp.r0 != DS4_TYPE_F16) {
        rp_lost(r, NULL);
        return DS4_TYPE_F32;
    }
    return (int)rp.r0;
}

static int rp_reserve(void *ctx, const ds4_model *bound, int n_batch, int n_ctx, ds4_err *err) {
    rp_ctx *r = ctx;
    req q = {.op = OP_RESERVE, .k = (uint32_t)bind_index(r, bound), .a = (uint64_t)n_batch, .b = (uint64_t)n_ctx};
    rep rp;
    return rp_call(r, q, NULL, &rp, NULL, 0, err);
}

static void *rp_alloc(void *ctx, size_t bytes) {
    rp_ctx *r = ctx;
    req q = {.op = OP_ALLOC, .a = bytes};
    rep rp;
    return rp_call(r, q, NULL, &rp, NULL, 0, NULL) ? NULL : (void *)(uintptr_t)rp.r0;
}

static void rp_free(void *ctx, void *p) {
    rp_ctx *r = ctx;
    req q = {.op = OP_FREE, .a = (uint64_t)(uintptr_t)p};
    rp_call(r, q, NULL, NULL, NULL, 0, NULL);
}

static int rp_upload(void *ctx, void *dst, const void *src, size_t bytes, ds4_err *err) {
    rp_ctx *r = ctx;
    req q = {.op = OP_UPLOAD, .a = (uint64_t)(uintptr_t)dst, .len = bytes};
    rep rp;
    return rp_call(r, q, src, &rp, NULL, 0, err);
}

static int rp_download(void *ctx, void *dst, const void *src, size_t bytes, ds4_err *err) {
    rp_ctx *r = ctx;
    req q = {.op = OP_DOWNLOAD, .a = (uint64_t)(uintptr_t)src, .b = bytes};
    rep rp;
    int rc = rp_call(r, q, NULL, &rp, dst, bytes, err);
    if (!rc && rp.len != bytes) return rp_lost(r, err);
    return rc;
}

static int rp_copy(void *ctx, void *dst, const void *src, size_t bytes, ds4_err *err) {
    rp_ctx *r = ctx;
    req q = {.op = OP_COPY, .a = (uint64_t)(uintptr_t)dst, .b = (uint64_t)(uintptr_t)src, .c = bytes};
    rep rp;
    return rp_call(r, q, NULL, &rp, NULL, 0, err);
}

static int rp_copy_many(void *ctx, const ds4_copy *v, int n, ds4_err *err) {
    rp_ctx *r = ctx;
    uint64_t buf[3 * 64];
    for (int i0 = 0; i0 < n; i0 += 64) {
        int m = n - i0 < 64 ? n - i0 : 64;
        for (int i = 0; i < m; i++) {
            buf[3 * i] = (uint64_t)(uintptr_t)v[i0 + i].dst;
            buf[3 * i + 1] = (uint64_t)(uintptr_t)v[i0 + i].src;
            buf[3 * i + 2] = v[i0 + i].bytes;
        }
        req q = {.op = OP_COPY_MANY, .a = (uint64_t)m, .len = (uint64_t)m * 3 * sizeof(uint64_t)};
        rep rp;
        int rc = rp_call(r, q, buf, &rp, NULL, 0, err);
        if (rc) return rc;
    }
    return 0;
}

static int rp_step_begin(void *ctx, const ds4_step_info *si, ds4_err *err) {
    rp_ctx *r = ctx;
    req q = {.op = OP_STEP_BEGIN, .a = (uint64_t)(uintptr_t)si->step, .b = (uint64_t)(uint32_t)si->n,
             .c = (uint64_t)(uint32_t)si->pos0, .len = sizeof si->graph_key};
    rep rp;
    int rc = rp_call(r, q, &si->graph_key, &rp, NULL, 0, err);
    if (!rc && rp.r0 > 1) return rp_lost(r, err); /* replayed (1) or not (0): anything else is not a worker's */
    return rc ? rc : (int)rp.r0;
}

static int rp_step_end(void *ctx, ds4_err *err) {
    rp_ctx *r = ctx;
    req q = {.op = OP_STEP_END};
    rep rp;
    return rp_call(r, q, NULL, &rp, NULL, 0, err);
}

static void rp_forget(void *ctx, uint64_t key) {
    rp_ctx *r = ctx;
    req q = {.op = OP_FORGET, .a = key};
    rp_call(r, q, NULL, NULL, NULL, 0, NULL);
}

static int rp_argmax(void *ctx, const float *logits, int n_rows, int n_vocab, int32_t *ids, ds4_err *err) {
    rp_ctx *r = ctx;
    req q = {.op = OP_ARGMAX, .a = (uint64_t)(uintptr_t)logits, .b = (uint64_t)n_rows, .c = (uint64_t)n_vocab};
    rep rp;
    int rc = rp_call(r, q, NULL, &rp, ids, (size_t)n_rows * sizeof(int32_t), err);
    if (!rc && rp.len != (size_t)n_rows * sizeof(int32_t)) return rp_lost(r, err);
    return rc;
}

static void rp_prof_mark(void *ctx, int kind) {
    rp_ctx *r = ctx;
    req q = {.op = OP_PROF_MARK, .a = (uint64_t)(uint32_t)kind};
    rp_call(r, q, NULL, NULL, NULL, 0, NULL);
}

static int rp_prof_read(void *ctx, double *ms) {
    rp_ctx *r = ctx;
    req q = {.op = OP_PROF_READ};
    rep rp;
    int rc = rp_call(r, q, NULL, &rp, ms, DS4_PROF_N * sizeof(double), NULL);
    if (rc || rp.len != DS4_PROF_N * sizeof(double)) {
        for (int i = 0; i < DS4_PROF_N; i++) ms[i] = 0;
        return rc ? rc : DS4_E_BACKEND;
    }
    return 0;
}

static int rp_bandwidth(void *ctx, double *gbps, ds4_err *err) {
    rp_ctx *r = ctx;
    req q = {.op = OP_BANDWIDTH};
    rep rp;
    int rc = rp_call(r, q, NULL, &rp, gbps, sizeof *gbps, err);
    return rc ? rc : rp.len == sizeof *gbps ? 0 : rp_lost(r, err);
}

static void rp_describe(void *ctx, char *buf, size_t cap) {
    rp_ctx *r = ctx;
    req q = {.op = OP_DESCRIBE};
    rep rp;
    char tmp[1024];
    int n = snprintf(buf, cap, "rank %d: ", r->ch->rank);
    if (rp_call(r, q, NULL, &rp, tmp, sizeof tmp - 1, NULL)) {
        snprintf(buf + n, cap > (size_t)n ? cap - (size_t)n : 0, "(no answer)");
        return;
    }
    tmp[rp.len] = 0;
    snprintf(buf + n, cap > (size_t)n ? cap - (size_t)n : 0, "%s", tmp);
}

static const ds4_backend_ops remote_ops = {
    .name = "remote",
    .destroy = rp_destroy,
    .check_model = rp_check_model,
    .bind_model = rp_bind_model,
    .unbind_model = rp_unbind_model,
    .kv_row_type = rp_kv_row_type,
    .reserve = rp_reserve,
    .alloc = rp_alloc,
    .free = rp_free,
    .upload = rp_upload,
    .download = rp_download,
    .copy = rp_copy,
    .copy_many = rp_copy_many,
    .step_begin = rp_step_begin,
    .step_end = rp_step_end,
    .forget = rp_forget,
    .argmax = rp_argmax,
    .prof_mark = rp_prof_mark,
    .prof_read = rp_prof_read,
    .bandwidth = rp_bandwidth,
    .describe = rp_describe,
    .embed = rp_embed,
    .hc_pre = rp_hc_pre,
    .attn_project = rp_attn_project,
    .compress_update = rp_compress,
    .indexer_select = rp_indexer,
    .attention = rp_attention,
    .kv_store = rp_kv_store,
    .hc_post = rp_hc_post,
    .moe_route = rp_moe_route,
    .moe_experts = rp_moe_experts,
    .head = rp_head,
    .mtp_embed = rp_mtp_embed,
    .lost = rp_lost_q,
};

static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }

bool ds4_remote_lost(const ds4_backend *be) { return be->ops == &remote_ops && ((const rp_ctx *)be->ctx)->failed; }

int ds4_remote_backend_new(ds4_chan *ch, const ds4_remote_model *rm, ds4_backend *out, ds4_err *err) {
    rp_ctx *r = calloc(1, sizeof *r);
    if (!r) {
        ds4_chan_close(ch);
        return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    }
    r->ch = ch;
    r->path = dup_or_null(rm->model_path);
    r->mtp_path = dup_or_null(rm->mtp_path);
    r->synthetic = dup_or_null(rm->synthetic);
    r->seed = rm->seed;
    memcpy(r->fp, rm->fp, 32);
    r->timeout_s = rm->reply_timeout_s > 0 ? rm->reply_timeout_s : RP_REPLY_TIMEOUT_S;
    out->ops = &remote_ops;
    out->ctx = r;
    return 0;
}

/* ------------------------------------------------------------ worker */

typedef struct wk_bind {
    ds4_model host;           /* the loaded (or synthetic) model */
    bool have_host;
    ds4_model *part;          /* its part (main) */
    ds4_model *bound;         /* the backend's binding */
    ds4_gguf *g;
} wk_bind;

typedef struct wk {
    ds4_chan *ch;
    ds4_backend be;
    bool have_be;
    wk_bind b[2];
    int stage_rc;             /* the first failed stage of this step */
    char stage_msg[200];
    unsigned char *buf;
    size_t cap;
} wk;

static int wk_reply(wk *w, int rc, const char *msg, uint64_t r0, const void *payload, size_t len) {
    rep rp = {.rc = rc, .msg_len = msg && rc ? (uint32_t)strlen(msg) : 0, .r0 = r0, .len = len};
    if (ch_send(w->ch, &rp, sizeof rp) || ch_send(w->ch, msg, rp.msg_len) || ch_send(w->ch, payload, len))
        return DS4_E_IO;
    return 0;
}

static int wk_grow(wk *w, size_t n) {
    if (n <= w->cap) return 0;
    unsigned char *p = realloc(w->buf, n);
    if (!p) return DS4_E_NOMEM;
    w->buf = p;
    w->cap = n;
    return 0;
}

static void wk_unbind(wk *w, int k) {
    wk_bind *b = &w->b[k];
    if (b->bound) w->be.ops->unbind_model(w->be.ctx, b->bound);
    ds4_model_mirror_free(b->part);
    if (b->have_host && b->host.weights_loaded) ds4_model_free(&b->host);
    ds4_gguf_close(b->g);
    *b = (wk_bind){0};
}

static int wk_bind_model(wk *w, const unsigned char *p, size_t len, const char *path_override, ds4_backend_factory mk,
                         void *user, ds4_err *err) {
    bind_req b;
    /* a malformed request is answered (rank 0 reports it), not a reason to hang up */
    if (len < sizeof b) {
        ds4_err_set(err, DS4_E_ARG, "short bind request (%zu bytes)", len);
        return wk_reply(w, DS4_E_ARG, err->msg, 0, NULL, 0) ? DS4_E_IO : 0;
    }
    memcpy(&b, p, sizeof b);
    if (sizeof b + (size_t)b.path_len + b.mtp_len + b.syn_len != len) {
        ds4_err_set(err, DS4_E_ARG, "malformed bind request (its lengths do not add up to %zu bytes)", len);
        return wk_reply(w, DS4_E_ARG, err->msg, 0, NULL, 0) ? DS4_E_IO : 0;
    }
    char *path = strndup((const char *)p + sizeof b, b.path_len);
    char *mp = strndup((const char *)p + sizeof b + b.path_len, b.mtp_len);
    char *sy = strndup((const char *)p + sizeof b + b.path_len + b.mtp_len, b.syn_len);
    int rc = 0, k = b.mtp ? 1 : 0;
    if (!path || !mp || !sy) rc = ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    if (!rc && !w->have_be) {
        if ((rc = mk(user, &w->be, err)) == 0) w->have_be = true;
    }
    const bool already = w->b[k].bound != NULL; /* refused below; the binding in place stays */
    if (!rc && already) rc = ds4_err_set(err, DS4_E_ARG, "a %s model is bound already", k ? "MTP" : "main");
    wk_bind *main = &w->b[0], *wb = &w->b[k];
    if (!rc && !main->have_host) { /* the main model: the blocks' and the MTP block's base */
        const char *mpath = path_override ? path_override : path;
        if (b.synthetic) rc = ds4_model_synth(&main->host, sy, b.seed, err);
        else if (!(rc = ds4_gguf_open(&main->g, mpath, err))) rc = ds4_model_load(&main->host, main->g, err);
        if (!rc) main->have_host = true;
    }
    ds4_model *src = NULL;
    if (!rc && k == 1) {
        if (b.synthetic) rc = ds4_model_synth_mtp(&wb->host, &main->host, b.seed, err);
        else if (!(rc = ds4_gguf_open(&wb->g, mp, err))) rc = ds4_model_load_mtp(&wb->host, &main->host, wb->g, err);
        if (!rc) {
            wb->have_host = true;
            src = &wb->host;
        }
    } else if (!rc) {
        if (b.l0 < 0 || b.l1 > main->host.hp.n_layer || b.l0 >= b.l1)
            rc = ds4_err_set(err, DS4_E_ARG, "blocks %d..%d of a %d-block model", b.l0, b.l1, main->host.hp.n_layer);
        else if (!(wb->part = ds4_model_part(&main->host, b.l0, b.l1, b.first, b.last)))
            rc = ds4_err_set(err, DS4_E_NOMEM, "out of memory");
        src = wb->part;
    }
    if (!rc) rc = w->be.ops->check_model(w->be.ctx, src, err);
    if (!rc) {
        ds4_bind_opts bo = {.synthetic = b.synthetic, .seed = b.seed};
        rc = w->be.ops->bind_model(w->be.ctx, src, &bo, &wb->bound, err);
    }
    ptr_list pl = {0};
    if (!rc) {
        collect_weight(&pl, &(ds4_weight){.data = wb->bound->layers}); /* [0] the layers array */
        collect_weight(&pl, &(ds4_weight){.data = NULL});               /* [1] the count, below */
        for (int i = 0; i < 4; i++) collect_weight(&pl, &(ds4_weight){.data = NULL}); /* [2..5] fingerprint */
        ds4_model_visit vis = {collect_weight, collect_vec, &pl};
        ds4_model_visit_all(wb->bound, &vis);
        if (pl.fail) rc = ds4_err_set(err, DS4_E_NOMEM, "out of memory");
        else {
            pl.v[1] = pl.n - 6;
            /* the file's identity (ds4_gguf_identity: header, tensor table and
             * samples of every tensor), or the synthetic recipe and seed */
            if (main->g) {
                if (ds4_gguf_identity(main->g, (uint8_t *)(pl.v + 2)))
                    rc = ds4_err_set(err, DS4_E_INTERNAL, "SHA-256 failed");
            } else {
                char syn[96];
                size_t hn = (size_t)snprintf(syn, sizeof syn, "ds4 synthetic %s seed %llu", sy, (unsigned long long)b.seed);
                unsigned int dl = 0;
                if (!EVP_Digest(syn, hn, (unsigned char *)(pl.v + 2), &dl, EVP_sha256(), NULL) || dl != 32)
                    rc = ds4_err_set(err, DS4_E_INTERNAL, "SHA-256 failed");
            }
        }
    }
    free(path);
    free(mp);
    free(sy);
    if (rc) {
        free(pl.v);
        if (!already && (k == 1 || !w->b[0].bound)) wk_unbind(w, k);
        return wk_reply(w, rc, err->msg, 0, NULL, 0) ? DS4_E_IO : 0;
    }
    int wr = wk_reply(w, 0, NULL, (uint64_t)(uintptr_t)wb->bound, pl.v, pl.n * sizeof(uint64_t));
    free(pl.v);
    return wr;
}

typedef int (*stage_fn)(void *, const void *);

static stage_fn stage_op(const ds4_backend_ops *o, int kind) {
    switch (kind) {
    case ST_EMBED: return (stage_fn)o->embed;
    case ST_HC_PRE: return (stage_fn)o->hc_pre;
    case ST_ATTN_PROJECT: return (stage_fn)o->attn_project;
    case ST_COMPRESS: return (stage_fn)o->compress_update;
    case ST_INDEXER: return (stage_fn)o->indexer_select;
    case ST_ATTENTION: return (stage_fn)o->attention;
    case ST_KV_STORE: return (stage_fn)o->kv_store;
    case ST_HC_POST: return (stage_fn)o->hc_post;
    case ST_MOE_ROUTE: return (stage_fn)o->moe_route;
    case ST_MOE_EXPERTS: return (stage_fn)o->moe_experts;
    case ST_HEAD: return (stage_fn)o->head;
    case ST_MTP_EMBED: return (stage_fn)o->mtp_embed;
    default: return NULL;
    }
}

int ds4_worker_serve(ds4_chan *ch, const char *path, ds4_backend_factory make_backend, void *user, ds4_err *err) {
    wk w = {.ch = ch};
    int rc = 0;
    for (;;) {
        req q;
        if (ch_recv(ch, &q, sizeof q)) {
            rc = ds4_err_set(err, DS4_E_IO, "rank 0 closed the connection");
            break;
        }
        /* what the header says is checked before its payload is read or
         * any memory is reserved for it: a known op, a model bound first,
         * and a payload only where the op carries one (uploads, bind, stage
         * descriptors, copy lists, the step key) */
        const bool payload = q.op == OP_BIND || q.op == OP_UPLOAD || q.op == OP_STAGE || q.op == OP_COPY_MANY ||
                             q.op == OP_STEP_BEGIN;
        if (q.op < OP_BIND || q.op > OP_BYE || (!payload && q.len) ||
            (q.op != OP_BIND && q.op != OP_BYE && !w.have_be)) {
            rc = ds4_err_set(err, DS4_E_IO, "rank 0 sent %s (op %u, %llu bytes)",
                             q.op < OP_BIND || q.op > OP_BYE ? "an unknown request"
                             : !w.have_be && q.op != OP_BIND ? "a request before binding a model"
                                                               : "a payload with a request that has none",
                             q.op, (unsigned long long)q.len);
            break;
        }
        if (q.len > ((uint64_t)1 << 34) || wk_grow(&w, (size_t)q.len + 1)) {
            rc = ds4_err_set(err, DS4_E_IO, "a request of %llu bytes could not be held", (unsigned long long)q.len);
            break;
        }
        if (ch_recv(ch, w.buf, (size_t)q.len)) {
            /* rank 0 that dies while sending leaves a cut request: the same end as a closed connection */
            rc = ds4_err_set(err, DS4_E_IO, "rank 0 closed the connection inside a request of %llu bytes",
                             (unsigned long long)q.len);
            break;
        }
        if (q.op == OP_BYE) break;
        if (q.op != OP_BIND && !w.have_be) {
            rc = ds4_err_set(err, DS4_E_IO, "rank 0 sent op %u before binding a model", q.op);
            break;
        }
        const ds4_backend_ops *o = w.have_be ? w.be.ops : NULL;
        void *c = w.have_be ? w.be.ctx : NULL;
        ds4_err e = {0};
        int r = 0, io = 0;
        switch (q.op) {
        case OP_BIND: io = wk_bind_model(&w, w.buf, (size_t)q.len, path, make_backend, user, &e); break;
        case OP_UNBIND:
            /* an MTP block borrows the main model's embedding and head: the
             * main model goes only after it (rank 0 unbinds in that order) */
            if (!q.k && w.b[1].bound) {
                io = wk_reply(&w, DS4_E_ARG, "the MTP block is still bound: unbind it first", 0, NULL, 0);
                break;
            }
            wk_unbind(&w, q.k ? 1 : 0);
            io = wk_reply(&w, 0, NULL, 0, NULL, 0);
            break;
        case OP_ROW_TYPE: {
            ds4_numerics num = {.fp8_kv = q.a & 1, .fp4_indexer = q.a >> 1 & 1, .f16_cache = q.a >> 2 & 1,
                                .act_quant = q.a >> 3 & 1};
            io = wk_reply(&w, 0, NULL, (uint64_t)o->kv_row_type(c, num), NULL, 0);
            break;
        }
        case OP_RESERVE:
            r = o->reserve(c, w.b[q.k ? 1 : 0].bound, (int)q.a, (int)q.b, &e);
            io = wk_reply(&w, r, e.msg, 0, NULL, 0);
            break;
        case OP_ALLOC: {
            void *p = o->alloc(c, (size_t)q.a);
            io = wk_reply(&w, p ? 0 : DS4_E_NOMEM, "out of memory", (uint64_t)(uintptr_t)p, NULL, 0);
            break;
        }
        case OP_FREE: o->free(c, (void *)(uintptr_t)q.a); break;
        case OP_UPLOAD:
            r = o->upload(c, (void *)(uintptr_t)q.a, w.buf, (size_t)q.len, &e);
            io = wk_reply(&w, r, e.msg, 0, NULL, 0);
            break;
        case OP_DOWNLOAD:
            if (wk_grow(&w, (size_t)q.b)) r = ds4_err_set(&e, DS4_E_NOMEM, "out of memory");
            else r = o->download(c, w.buf, (const void *)(uintptr_t)q.a, (size_t)q.b, &e);
            io = wk_reply(&w, r, e.msg, 0, w.buf, r ? 0 : (size_t)q.b);
            break;
        case OP_COPY:
            r = o->copy(c, (void *)(uintptr_t)q.a, (const void *)(uintptr_t)q.b, (size_t)q.c, &e);
            io = wk_reply(&w, r, e.msg, 0, NULL, 0);
            break;
        case OP_COPY_MANY: {
            ds4_copy v[64];
            int n = (int)q.a;
            if (n < 0 || n > 64 || q.len != (uint64_t)n * 3 * sizeof(uint64_t)) {
                r = ds4_err_set(&e, DS4_E_INTERNAL, "malformed copy request");
            } else {
                for (int i = 0; i < n; i++) {
                    uint64_t t[3];
                    memcpy(t, w.buf + 24 * i, 24);
                    v[i] = (ds4_copy){(void *)(uintptr_t)t[0], (const void *)(uintptr_t)t[1], (size_t)t[2]};
                }
                if (o->copy_many) r = o->copy_many(c, v, n, &e);
                else
                    for (int i = 0; i < n && !r; i++) r = o->copy(c, v[i].dst, v[i].src, v[i].bytes, &e);
            }
            io = wk_reply(&w, r, e.msg, 0, NULL, 0);
            break;
        }
        case OP_STEP_BEGIN: {
            ds4_step_info si = {.step = (const ds4_step *)(uintptr_t)q.a, .n = (int)q.b, .pos0 = (int)q.c};
            if (q.len == sizeof si.graph_key) memcpy(&si.graph_key, w.buf, sizeof si.graph_key);
            w.stage_rc = 0;
            r = o->step_begin(c, &si, &e);
            io = wk_reply(&w, r < 0 ? r : 0, e.msg, (uint64_t)(r > 0 ? r : 0), NULL, 0);
            break;
        }
        case OP_STEP_END:
            r = o->step_end(c, &e);
            if (!r && w.stage_rc) r = ds4_err_set(&e, w.stage_rc, "%s", w.stage_msg);
            w.stage_rc = 0;
            io = wk_reply(&w, r, e.msg, 0, NULL, 0);
            break;
        case OP_FORGET: o->forget(c, q.a); break;
        case OP_ARGMAX: {
            size_t nb = (size_t)q.b * sizeof(int32_t);
            if (wk_grow(&w, nb)) r = ds4_err_set(&e, DS4_E_NOMEM, "out of memory");
            else r = o->argmax(c, (const float *)(uintptr_t)q.a, (int)q.b, (int)q.c, (int32_t *)w.buf, &e);
            io = wk_reply(&w, r, e.msg, 0, w.buf, r ? 0 : nb);
            break;
        }
        case OP_PROF_MARK:
            if (o->prof_mark) o->prof_mark(c, (int)q.a);
            break;
        case OP_PROF_READ: {
            double ms[DS4_PROF_N] = {0};
            r = o->prof_read ? o->prof_read(c, ms) : DS4_E_ARG;
            io = wk_reply(&w, r, "no profile", 0, ms, r ? 0 : sizeof ms);
            break;
        }
        case OP_BANDWIDTH: {
            double g = 0;
            r = o->bandwidth ? o->bandwidth(c, &g, &e) : ds4_err_set(&e, DS4_E_ARG, "no bandwidth probe");
            io = wk_reply(&w, r, e.msg, 0, &g, r ? 0 : sizeof g);
            break;
        }
        case OP_DESCRIBE: {
            char d[1000] = "";
            if (o->describe) o->describe(c, d, sizeof d);
            else snprintf(d, sizeof d, "%s backend", o->name);
            io = wk_reply(&w, 0, NULL, 0, d, strlen(d));
            break;
        }
        case OP_STAGE: {
            stage_fn f = q.k < ST_N ? stage_op(o, (int)q.k) : NULL;
            if (!f || q.len != stage_desc[q.k].size) {
                if (!w.stage_rc) {
                    w.stage_rc = DS4_E_INTERNAL;
                    snprintf(w.stage_msg, sizeof w.stage_msg, "stage %u unknown or malformed", q.k);
                }
            } else if (!w.stage_rc) { /* after a failed stage the step only waits for step_end */
                unsigned char a[MAX_ARGS] __attribute__((aligned(16)));
                memcpy(a, w.buf, (size_t)q.len);
                int sr = f(c, a);
                if (sr) {
                    w.stage_rc = sr < 0 ? sr : DS4_E_INTERNAL;
                    snprintf(w.stage_msg, sizeof w.stage_msg, "%s backend: a stage failed", o->name);
                }
            }
            break;
        }
        default: rc = ds4_err_set(err, DS4_E_IO, "unknown op %u from rank 0", q.op); break;
        }
        if (rc) break;
        if (io) {
            rc = ds4_err_set(err, DS4_E_IO, "rank 0 closed the connection");
            break;
        }
    }
    for (int k = 1; k >= 0; k--) wk_unbind(&w, k);
    if (w.have_be) w.be.ops->destroy(w.be.ctx);
    free(w.buf);
    return rc;
}
