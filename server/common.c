/* common.c - helpers shared by the server's threads: the log line format,
 * the job byte stream written by the worker (drained by http.c), ids, and
 * the API -> emitter table. Everything here is thread-safe: stream writes
 * take the job's stream mutex, logging takes a process-wide mutex.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "server.h"

static pthread_mutex_t g_log_mu = PTHREAD_MUTEX_INITIALIZER;

void srv_log(const char *fmt, ...) {
    char line[2048];
    time_t now = time(NULL);
    struct tm tm;
    localtime_r(&now, &tm);
    int n = (int)strftime(line, sizeof line, "%m%d %H:%M:%S ", &tm);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&g_log_mu);
    fprintf(stderr, "%s\n", line);
    pthread_mutex_unlock(&g_log_mu);
}

/* ---- stream helpers (worker side) ------------------------------------------ */

/* Bytes a stream may hold for a client that does not read them: past this
 * the client is treated as gone (the job stops) instead of the server
 * buffering without bound (minutes of output at any real speed). */
#define SRV_STREAM_BACKLOG ((size_t)8 << 20)

void srv_stream_write(srv_job *j, const char *s, size_t n) {
    bool over = false;
    pthread_mutex_lock(&j->st.mu);
    if (!j->st.client_gone) {
        if (!j->st.pending.len) j->st.last_drain = srv_now_mono();
        j->st.last_write = srv_now_mono();
        ds4_buf_append(&j->st.pending, s, n);
        if (j->st.pending.oom) j->st.client_gone = true;
        if (j->st.pending.len > SRV_STREAM_BACKLOG) over = j->st.client_gone = true;
    }
    pthread_cond_broadcast(&j->st.cv);
    pthread_mutex_unlock(&j->st.mu);
    if (over) srv_log("request %s: the client read none of %zu MiB of stream; stopped", j->id, SRV_STREAM_BACKLOG >> 20);
}

void srv_stream_printf(srv_job *j, const char *fmt, ...) {
    char tmp[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n > 0) srv_stream_write(j, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

void srv_sse_json(srv_job *j, const char *event, json_t *v) {
    if (!v) return; /* a failed json_pack: nothing sensible to send */
    char *s = srv_json_text(v);
    json_decref(v);
    ds4_buf b = DS4_BUF_INIT;
    if (event) ds4_buf_printf(&b, "event: %s\n", event);
    ds4_buf_puts(&b, "data: ");
    ds4_buf_puts(&b, s);
    ds4_buf_puts(&b, "\n\n");
    free(s);
    if (ds4_buf_ok(&b)) srv_stream_write(j, b.data, b.len);
    ds4_buf_free(&b);
}

void srv_stream_headers(srv_job *j) {
    pthread_mutex_lock(&j->st.mu);
    j->st.headers = true;
    pthread_cond_broadcast(&j->st.cv);
    pthread_mutex_unlock(&j->st.mu);
}

void srv_stream_close(srv_job *j) {
    pthread_mutex_lock(&j->st.mu);
    j->state = SRV_JOB_DONE;
    j->st.done = true;
    pthread_cond_broadcast(&j->st.cv);
    pthread_mutex_unlock(&j->st.mu);
}

double srv_now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

void srv_random_id(char *out, size_t cap, const char *prefix, int n_bytes) {
    char tmp[128];
    if (ds4_dsml_call_id(tmp, sizeof tmp, "") != 0) snprintf(tmp, sizeof tmp, "%032llx", 0ULL);
    /* call ids carry 32 hex digits; trim to the requested width */
    size_t want = (size_t)n_bytes * 2;
    if (want > strlen(tmp)) want = strlen(tmp);
    snprintf(out, cap, "%s%.*s", prefix, (int)want, tmp);
}

const srv_emitter *srv_emitter_for(srv_api api) {
    switch (api) {
    case SRV_API_CHAT: return &srv_emitter_chat;
    case SRV_API_COMPLETIONS: return &srv_emitter_completions;
    case SRV_API_RESPONSES: return &srv_emitter_responses;
    case SRV_API_ANTHROPIC: return &srv_emitter_anthropic;
    }
    return &srv_emitter_chat;
}


int srv_parse_messages(json_t *root, srv_request *rq, srv_error *e,
                       int (*parse_one)(json_t *m, srv_request *rq, srv_error *e)) {
    json_t *msgs = json_object_get(root, "messages");
    if (!msgs || json_is_null(msgs)) return srv_fail_param(e, "messages", NULL, "missing messages");
    if (!json_is_array(msgs)) return srv_invalid(e);
    /* as the OpenAI and Anthropic APIs: a request needs a message to answer */
    if (json_array_size(msgs) == 0) return srv_fail_param(e, "messages", NULL, "messages must contain at least one message");
    size_t i;
    json_t *m;
    json_array_foreach(msgs, i, m) {
        if (parse_one(m, rq, e)) return -1;
    }
    return 0;
}
