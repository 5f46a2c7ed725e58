/* main.c - ds4-server: options (docs/SERVING.md B.1), engine and session setup,
 * signals, startup and orderly shutdown.
 *
 * Shutdown: the first SIGINT/SIGTERM makes new requests get 503, makes
 * running and queued generations end with finish "error" (queued: 503),
 * waits for the worker, closes the listener and lets the connection threads
 * write those last bytes (bounded, http.c), saves the live session to the
 * disk cache (reason shutdown) and exits 0. A second signal exits at once
 * with status 130.
 */
#include "util/num.h"

#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "ds4_debug.h"
#include "server.h"
#include "util/xalloc.h"
#include "util/file.h"

static volatile sig_atomic_t g_signals;
static void on_signal(int sig) {
    (void)sig;
    if (++g_signals >= 2) _exit(130);
}

/* While the server starts (model load and upload: minutes for the real
 * model) nothing runs that a shutdown would drain or save: a signal then
 * exits at once, status 128 + signal, as the default action would. The
 * thread is cancelled (sigwait is a cancellation point) before the main
 * thread takes the signals with its own sigwait. */
static void *startup_signals(void *arg) {
    const sigset_t *sigs = arg;
    int sig = 0;
    if (sigwait(sigs, &sig) == 0) {
        static const char msg[] = "ds4-server: interrupted while starting\n";
        ssize_t w = write(2, msg, sizeof msg - 1);
        (void)w;
        _exit(128 + sig);
    }
    return NULL;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: ds4-server -m MODEL.gguf [options]\n"
            "  -m, --model FILE            model GGUF (required)\n"
            "      --mtp FILE              MTP GGUF (optional): speculative decoding for every request\n"
            "      --mtp-draft N           MTP drafts per cycle, 1..4 (default 3)\n"
            "      --mtp-gate P            stop drafting below this MTP probability (default 0.3; 0 = never)\n"
            "      --cpu | --cuda          backend (default: CUDA when built with it and a GPU is present)\n"
            "      --gpus N|LIST           split the layers over N GPUs (or the devices listed, e.g. 0,1)\n"
            "      --split LIST            blocks per part, e.g. 22,21 (default: parts of equal bytes)\n"
            "      --ranks N --rendezvous HOST:PORT   part r in `ds4 --worker` process r\n"
            "  -t, --threads N             CPU threads (default: all cores)\n"
            "  -c, --ctx N                 context size (default 32768)\n"
            "  -n, --tokens N              default max output tokens (default 393216)\n"
            "      --chdir DIR             chdir before loading\n"
            "      --host HOST             IPv4 address or localhost (default 127.0.0.1)\n"
            "      --port N                port (default 8000; 0 = any free port)\n"
            "      --cors                  add CORS headers\n"
            "      --max-connections-per-client N  connections one client address (IPv6: one /64)\n"
            "                              may hold while they send their request (default 64;\n"
            "                              0 = no cap); past it, the oldest (>= 0.5 s) is closed or\n"
            "                              the new one refused. The server holds 512 connections in\n"
            "                              all; past that the oldest still sending is closed alike\n"
            "      --request-timeout S     the request line, headers and body must arrive within\n"
            "                              S seconds of connecting (default 30; 0 = no deadline);\n"
            "                              a connection that sends nothing for 10 s is closed\n"
            "      --api-key KEY           require 'Authorization: Bearer KEY' or 'x-api-key: KEY'\n"
            "                              (checked when the headers arrive; KEY must not be empty)\n"
            "      --allow-host NAME[,NAME] also accept these Host headers (repeatable; '*': any).\n"
            "                              By default only the --host address, localhost and\n"
            "                              127.0.0.1 are accepted (DNS-rebinding protection)\n"
            "      --trace FILE            human-readable per-request trace\n"
            "      --queue N               max queued requests before 429 (default 16)\n"
            "      --kv-disk-dir DIR       enable the disk KV cache\n"
            "      --kv-disk-space-mb N    disk budget (default 4096)\n"
            "      --kv-cache-min-tokens N (default 512)\n"
            "      --kv-cache-cold-max-tokens N (default 30000; 0 disables cold saves)\n"
            "      --kv-cache-continued-interval-tokens N (default 10000; 0 disables)\n"
            "      --kv-cache-boundary-trim-tokens N (default 32)\n"
            "      --kv-cache-boundary-align-tokens N (default 2048; 0 disables)\n"
            "      --kv-cache-reject-different-quant\n"
            "      --disable-exact-dsml-tool-replay\n"
            "      --tool-memory-max-ids N (default 100000)\n"
            "      --default-thinking [API=]MODE  thinking mode of requests that do not say:\n"
            "                              MODE on (default), off or max; API chat, completions,\n"
            "                              responses or anthropic (repeatable; no API: all).\n"
            "                              E.g. anthropic=off: Anthropic's API means off when\n"
            "                              'thinking' is absent\n"
            "  -h, --help                  this help;  --help-debug: diagnostic switches\n");
}

static void usage_debug(void) {
    printf("diagnostic switches (tests only, not user modes):\n"
           "  --debug-slow-connection-ms N   each connection thread sleeps N ms before it\n"
           "                                 writes (a loaded machine; shutdown-drain test)\n"
           "  --debug-reply TEXT             every reply generates TEXT's tokens (special\n"
           "                                 tokens and DSML markup parsed), then EOS, in place\n"
           "                                 of sampling (tests of what the server makes of a\n"
           "                                 given model output); under a forced tool call\n"
           "                                 TEXT is what the model prefers and the forced\n"
           "                                 rules still decide each token\n"
           "  --debug-mtp-accept P           with --mtp: speculative cycles accept each draft\n"
           "                                 with probability P (seeded) instead of verifying it;\n"
           "                                 the output is then not the model's (tests of what\n"
           "                                 the server does with accepted drafts)\n");
}

static int parse_int(const char *opt, const char *v, long lo, long hi, long *out) {
    if (ds4_parse_long(v, lo, hi, out)) {
        fprintf(stderr, "ds4-server: %s needs an integer in [%ld, %ld], got '%s'\n", opt, lo, hi, v ? v : "");
        return -1;
    }
    return 0;
}

/* --default-thinking [API=]MODE: MODE on|off|max (or high|none); API one of
 * chat, completions, responses, anthropic; no API sets all four. */
static int parse_default_thinking(const char *v, srv_config *c) {
    static const char *const apis[SRV_N_API] = {
        [SRV_API_CHAT] = "chat", [SRV_API_COMPLETIONS] = "completions",
        [SRV_API_RESPONSES] = "responses", [SRV_API_ANTHROPIC] = "anthropic"};
    if (!v) return -1;
    const char *eq = strchr(v, '=');
    const char *mode = eq ? eq + 1 : v;
    ds4_think t;
    if (!strcmp(mode, "on") || !strcmp(mode, "high")) t = DS4_THINK_HIGH;
    else if (!strcmp(mode, "off") || !strcmp(mode, "none")) t = DS4_THINK_NONE;
    else if (!strcmp(mode, "max")) t = DS4_THINK_MAX;
    else return -1;
    for (int k = 0; k < SRV_N_API; k++) {
        if (eq && (strlen(apis[k]) != (size_t)(eq - v) || strncmp(v, apis[k], (size_t)(eq - v))))
            continue;
        c->default_think[k] = t;
        if (eq) return 0;
    }
    return eq ? -1 : 0;
}

static int parse_args(int argc, char **argv, srv_config *c, const char **chdir_to) {
    memset(c, 0, sizeof *c);
    c->backend = DS4_BACKEND_AUTO;
    c->n_ctx = 32768;
    c->default_tokens = 393216;
    c->host = "127.0.0.1";
    c->port = 8000;
    c->queue_max = 16;
    c->kv_disk_space_mb = 4096;
    c->kv_min_tokens = 512;
    c->kv_cold_max_tokens = 30000;
    c->kv_continued_interval = 10000;
    c->kv_boundary_trim = 32;
    c->kv_boundary_align = 2048;
    c->tool_memory_max_ids = 100000;
    c->max_conn_per_client = 64;
    c->request_timeout_s = 30;
    c->mtp_draft = 3;
    c->mtp_gate = 0.3f;
    for (int k = 0; k < SRV_N_API; k++) c->default_think[k] = DS4_THINK_HIGH; /* B.5 */
    bool mtp_opts = false; /* --mtp-draft / --mtp-gate given: they need --mtp */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        long x;
#define INTOPT(name, lo, hi, field)                                    \
    if (!strcmp(a, name)) {                                            \
        if (parse_int(a, v, lo, hi, &x)) return -1;                    \
        c->field = x;                                                  \
        i++;                                                           \
        continue;                                                      \
    }
#define STROPT(name, field)                                            \
    if (!strcmp(a, name)) {                                            \
        if (!v) {                                                      \
            fprintf(stderr, "ds4-server: %s needs a value\n", a);      \
            return -1;                                                 \
        }                                                              \
        if (!*v) { /* --api-key "$UNSET" is not "no key", nor "" a dir */ \
            fprintf(stderr, "ds4-server: %s must not be empty\n", a);  \
            return -1;                                                 \
        }                                                              \
        c->field = v;                                                  \
        i++;                                                           \
        continue;                                                      \
    }
        if (!strcmp(a, "-h") || !strcmp(a, "--help") || !strcmp(a, "--help-debug")) {
            if (!strcmp(a, "--help-debug")) usage_debug();
            else usage(stdout);
            exit(fflush(stdout) == 0 && !ferror(stdout) ? 0 : 1); /* > /dev/full: the help was lost */
        }
        if (!strcmp(a, "--cpu")) { c->backend = DS4_BACKEND_CPU; continue; }
        if (!strcmp(a, "--cuda")) { c->backend = DS4_BACKEND_CUDA; continue; }
        if (!strcmp(a, "--cors")) { c->cors = true; continue; }
        if (!strcmp(a, "--kv-cache-reject-different-quant")) { c->kv_reject_different_quant = true; continue; }
        if (!strcmp(a, "--disable-exact-dsml-tool-replay")) { c->disable_exact_dsml_replay = true; continue; }
        {
            ds4_err e = {0};
            int pr = ds4_opts_parse_flag(&c->split, a, v, &e);
            if (pr < 0) {
                fprintf(stderr, "ds4-server: %s\n", e.msg);
                return -1;
            }
            if (pr == 0) {
                i++;
                continue;
            }
        }
        if (!strcmp(a, "--allow-host")) {
            if (!v || !*v) {
                fprintf(stderr, "ds4-server: --allow-host needs a host name\n");
                return -1;
            }
            /* comma-separated; the copies live as long as the process */
            char *list = xstrdup(v), *save = NULL;
            for (char *h = strtok_r(list, ",", &save); h; h = strtok_r(NULL, ",", &save)) {
                c->allow_hosts = xrealloc(c->allow_hosts, sizeof *c->allow_hosts * (size_t)(c->n_allow_hosts + 1));
                c->allow_hosts[c->n_allow_hosts++] = h;
            }
            i++;
            continue;
        }
        if (!strcmp(a, "--default-thinking")) {
            if (parse_default_thinking(v, c)) {
                fprintf(stderr, "ds4-server: --default-thinking needs [API=]MODE with MODE on, off "
                                "or max and API chat, completions, responses or anthropic\n");
                return -1;
            }
            i++;
            continue;
        }
        if (!strcmp(a, "--chdir")) {
            if (!v) return -1;
            *chdir_to = v;
            i++;
            continue;
        }
        STROPT("--debug-reply", debug_reply)
        STROPT("-m", model_path)
        STROPT("--model", model_path)
        STROPT("--mtp", mtp_path)
        if (!strcmp(a, "--mtp-draft") || !strcmp(a, "--mtp-gate")) mtp_opts = true;
        INTOPT("--mtp-draft", 1, 4, mtp_draft)
        if (!strcmp(a, "--debug-mtp-accept") || !strcmp(a, "--mtp-gate")) {
            double g;
            if (ds4_parse_double(v, 0.0, 1.0, &g)) {
                fprintf(stderr, "ds4-server: %s: expected a number in 0..1, got '%s'\n", a, v ? v : "");
                return -1;
            }
            *(!strcmp(a, "--mtp-gate") ? &c->mtp_gate : &c->debug_mtp_accept) = (float)g;
            i++;
            continue;
        }
        STROPT("--host", host)
        STROPT("--api-key", api_key)
        STROPT("--trace", trace_path)
        STROPT("--kv-disk-dir", kv_disk_dir)
        INTOPT("-t", 0, 4096, n_threads)
        INTOPT("--threads", 0, 4096, n_threads)
        INTOPT("-c", 16, INT_MAX, n_ctx)
        INTOPT("--ctx", 16, INT_MAX, n_ctx)
        INTOPT("-n", 0, INT_MAX, default_tokens)
        INTOPT("--tokens", 0, INT_MAX, default_tokens)
        INTOPT("--port", 0, 65535, port)
        INTOPT("--queue", 1, 100000, queue_max)
        INTOPT("--kv-disk-space-mb", 1, 1L << 40, kv_disk_space_mb) /* MiB << 20 stays in 64 bits */
        INTOPT("--kv-cache-min-tokens", 1, INT_MAX, kv_min_tokens)
        INTOPT("--kv-cache-cold-max-tokens", 0, INT_MAX, kv_cold_max_tokens)
        INTOPT("--kv-cache-continued-interval-tokens", 0, INT_MAX, kv_continued_interval)
        INTOPT("--kv-cache-boundary-trim-tokens", 0, INT_MAX, kv_boundary_trim)
        INTOPT("--kv-cache-boundary-align-tokens", 0, INT_MAX, kv_boundary_align)
        INTOPT("--tool-memory-max-ids", 1, INT_MAX, tool_memory_max_ids)
        INTOPT("--max-connections-per-client", 0, 100000, max_conn_per_client)
        INTOPT("--request-timeout", 0, 86400, request_timeout_s)
        INTOPT("--debug-slow-connection-ms", 0, 10000, debug_slow_conn_ms)
        fprintf(stderr, "ds4-server: unknown option %s (see --help)\n", a);
        return -1;
#undef INTOPT
#undef STROPT
    }
    if (!c->model_path) {
        fprintf(stderr, "ds4-server: -m MODEL.gguf is required\n");
        return -1;
    }
    if (mtp_opts && !c->mtp_path) {
        fprintf(stderr, "ds4-server: --mtp-draft and --mtp-gate need --mtp FILE\n");
        return -1;
    }
    if (c->kv_cold_max_tokens != 0 && c->kv_cold_max_tokens < c->kv_min_tokens) {
        fprintf(stderr, "ds4-server: --kv-cache-cold-max-tokens must be 0 or >= --kv-cache-min-tokens\n");
        return -1;
    }
    ds4_err se = {0};
    if (ds4_opts_check_split(&c->split, &se)) {
        fprintf(stderr, "ds4-server: %s\n", se.msg);
        return -1;
    }
    return 0;
}

static int load_progress(void *user, const char *what, int64_t done, int64_t total) {
    (void)user;
    (void)what;
    (void)done;
    (void)total;
    return g_signals ? 1 : 0;
}

int main(int argc, char **argv) {
    srv_server s;
    memset(&s, 0, sizeof s);
    const char *chdir_to = NULL;
    if (parse_args(argc, argv, &s.cfg, &chdir_to)) return 2;
    if (chdir_to && chdir(chdir_to)) {
        fprintf(stderr, "ds4-server: chdir %s: %s\n", chdir_to, strerror(errno));
        return 1;
    }
    (void)load_progress;
    pthread_mutex_init(&s.mu, NULL);
    pthread_cond_init(&s.cv, NULL);
    pthread_mutex_init(&s.replay_mu, NULL);
    pthread_mutex_init(&s.trace_mu, NULL);

    /* Signals are taken synchronously by the main thread (sigwait); every
     * thread started later inherits the blocked mask. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);
    /* a file-size limit (ulimit -f) fails a disk-cache write with EFBIG,
     * reported and survived, instead of killing the server */
    signal(SIGXFSZ, SIG_IGN);
    ds4_sigbus_message("ds4-server"); /* the model file truncated while mapped: say so */
    pthread_t sig_thread;
    const bool sig_thread_on = pthread_create(&sig_thread, NULL, startup_signals, &sigs) == 0;

    ds4_err err = {0};
    if (srv_http_listen(&s, &err)) {
        fprintf(stderr, "ds4-server: %s\n", err.msg);
        return 1;
    }
    ds4_engine_opts eo = {0};
    eo.model_path = s.cfg.model_path;
    eo.mtp_path = s.cfg.mtp_path;
    eo.backend = s.cfg.backend;
    eo.n_threads = s.cfg.n_threads;
    ds4_opts_copy_split(&eo, &s.cfg.split);
    if (ds4_engine_open(&s.engine, &eo, &err)) {
        fprintf(stderr, "ds4-server: %s\n", err.msg);
        srv_http_stop(&s);
        return 1;
    }
    if (!ds4_has_tokenizer(s.engine)) {
        fprintf(stderr, "ds4-server: %s has no tokenizer\n", s.cfg.model_path);
        ds4_engine_close(s.engine);
        srv_http_stop(&s);
        return 1;
    }
    ds4_session_opts so = {0};
    so.n_ctx = s.cfg.n_ctx;
    if (ds4_session_new(s.engine, &so, &s.session, &err)) {
        fprintf(stderr, "ds4-server: %s\n", err.msg);
        ds4_engine_close(s.engine);
        srv_http_stop(&s);
        return 1;
    }
    if (ds4_engine_has_mtp(s.engine)) {
        ds4_spec_opts sop = {.n_draft = s.cfg.mtp_draft, .gate = s.cfg.mtp_gate};
        if (ds4_session_spec_enable(s.session, &sop, &err)) {
            fprintf(stderr, "ds4-server: --mtp: %s\n", err.msg);
            ds4_session_free(s.session);
            ds4_engine_close(s.engine);
            srv_http_stop(&s);
            return 1;
        }
        if (s.cfg.debug_mtp_accept > 0.0f) {
            const float rates[4] = {s.cfg.debug_mtp_accept, s.cfg.debug_mtp_accept, s.cfg.debug_mtp_accept,
                                    s.cfg.debug_mtp_accept};
            ds4_debug_session_force_accept(s.session, rates, 4, 1);
        }
    }
    s.replay = ds4_dsml_replay_new((size_t)s.cfg.tool_memory_max_ids, 0);
    if (s.cfg.trace_path) {
        s.trace = fopen(s.cfg.trace_path, "a");
        if (!s.trace) {
            fprintf(stderr, "ds4-server: --trace %s: %s\n", s.cfg.trace_path, strerror(errno));
            ds4_dsml_replay_free(s.replay);
            ds4_session_free(s.session);
            ds4_engine_close(s.engine);
            srv_http_stop(&s);
            return 1;
        }
    }
    int rc = 1;
    if (srv_cache_open(&s, &err) || srv_worker_start(&s, &err) || srv_http_start(&s, &err)) {
        fprintf(stderr, "ds4-server: %s\n", err.msg);
        goto out;
    }
    srv_log("ds4-server: backend %s, context %d, model %s", ds4_engine_backend_name(s.engine),
            s.cfg.n_ctx, s.cfg.model_path);
    if (ds4_engine_has_mtp(s.engine))
        srv_log("ds4-server: MTP speculative decoding on: %s, %d drafts per cycle, gate %g", s.cfg.mtp_path,
                s.cfg.mtp_draft, (double)s.cfg.mtp_gate);
    if (sig_thread_on) { /* from here a signal is an orderly shutdown */
        pthread_cancel(sig_thread);
        pthread_join(sig_thread, NULL);
    }
    srv_log("ds4-server: listening on http://%s:%d", s.cfg.host, s.cfg.port);
    int sig = 0;
    sigwait(&sigs, &sig);
    g_signals = 1;
    /* a second signal exits at once */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    pthread_sigmask(SIG_UNBLOCK, &sigs, NULL);
    srv_log("ds4-server: shutting down (signal %d)", sig);
    s.shutdown_flag = 1;
    pthread_mutex_lock(&s.mu);
    s.stopping = true; /* new requests: 503 */
    pthread_mutex_unlock(&s.mu);
    srv_worker_stop(&s);
    srv_http_stop(&s);
    srv_cache_shutdown(&s);
    rc = s.exit_code;
out:
    srv_http_stop(&s);
    if (s.worker_started) srv_worker_stop(&s);
    srv_cache_close(&s);
    ds4_dsml_replay_free(s.replay);
    if (s.trace) fclose(s.trace);
    ds4_session_free(s.session);
    ds4_engine_close(s.engine);
    return rc;
}
