/* engine.c - ds4.h: engine open/close, tokenizer wrappers, sessions (prefix
 * sync, extend in three evaluation modes, rewind), session snapshots and the
 * model fingerprint.
 *
 * Invariants: an engine is immutable after open. A session's tokens[0..n)
 * always describe exactly the state held by its ds4_fwd (position n), and
 * `logits` holds the logits after tokens[n-1] whenever n > 0. Any failure
 * while evaluating leaves the session empty (n = 0), never half-updated.
 * Rewind and diverging syncs restore the latest light checkpoint inside the
 * kept prefix (or start over) and re-evaluate the rest; because prefill and
 * decode are bit-identical on the CPU the result equals a fresh run.
 */
#include "ds4.h"
#include "ds4_debug.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "ds4_debug.h"
#include "forward.h"
#include "gguf.h"
#include "model.h"
#include "quant.h"
#include "remote.h"
#include "sampler.h"
#include "tokenizer.h"
#include "util/xalloc.h"

#define DEFAULT_PREFILL_CHUNK 128

struct ds4_engine {
    ds4_gguf *g;           /* NULL for a synthetic model */
    ds4_model m;           /* host description (weights in the mapping) */
    ds4_model *bm[DS4_FWD_MAX_PARTS]; /* each part's binding of m (stages read these) */
    ds4_hparams hp;        /* vocab-only opens: hyperparameters if present */
    bool have_hp;
    bool vocab_only;
    ds4_tokenizer *tok;
    /* the backend of each part of a layer split (one without a split); the
     * MTP block binds to the last one, which holds the head */
    ds4_backend be[DS4_FWD_MAX_PARTS];
    int n_be;              /* backends created */
    int n_parts;
    int n_ranks;           /* parts in other processes + 1 (1: none) */
    ds4_model *part[DS4_FWD_MAX_PARTS]; /* host descriptions of the parts (n_parts > 1) */
    int l0[DS4_FWD_MAX_PARTS], l1[DS4_FWD_MAX_PARTS];
    bool have_be;
    ds4_numerics num;
    uint8_t fp[32];
    char describe[2048];
    char device[512];
    int layer_limit;       /* debug: blocks evaluated, 0 = all */
    /* the MTP block (opts.mtp_path), a one-layer model beside m */
    ds4_gguf *g_mtp;
    ds4_model mtp;
    ds4_model *bmtp;       /* the backend's binding of mtp */
    bool host_backend;     /* CPU / strict: stage buffers are host memory */
    ds4_debug_moe_fn moe_fn; /* debug: routed-expert observer of new sessions (imatrix) */
    void *moe_user;
};

/* A light checkpoint (forward.h): the state at `pos` for the timeline that
 * currently starts with tokens[0..pos). Taken at the end of multi-token
 * evaluations; rewind and sync restore the latest one at or before the point
 * they keep, instead of recomputing from the start. */
#define N_CKPT 4
typedef struct ckpt {
    int pos;               /* 0 = unused */
    uint64_t seq;          /* age, for replacement */
    void *state;           /* ds4_fwd_ckpt_bytes */
    float *logits;         /* (n_vocab) after tokens[pos-1] */
} ckpt;

struct ds4_session {
    ds4_engine *e;
    int n_ctx, n_batch;
    int32_t *tokens;       /* (n_ctx) */
    int n_tokens;
    float *logits;         /* (n_vocab) after the last token, when logits_host */
    bool logits_host;      /* logits[] is current; else they are only in the backend */
    ds4_fwd *f;
    ckpt ck[N_CKPT];
    uint64_t ck_seq;
    /* speculative decoding (ds4_session_spec_enable). The MTP window holds
     * the pairs (h_i, t_{i+1}) of main indices mbase .. mbase + pos(mf) - 1
     * (h_i = the main model's final state after token i); hc_pos is the
     * main index whose state mf keeps aside (-1 none). */
    bool spec;
    ds4_spec_opts so;
    ds4_spec_stats st;
    ds4_fwd *mf;
    int mbase, hc_pos;
    ds4_debug_drafter drafter;
    void *drafter_user;
    float force_rate[4];   /* benchmarks: forced acceptance (n_force > 0) */
    int n_force;
    ds4_rng force_rng;
    float *row;            /* (n_vocab) host logits / probabilities */
    int32_t *mtok;         /* (n_batch + 1) tokens of an MTP feed */
    ds4_sampler *smp;
};

/* ------------------------------------------------------------ engine */

static int fingerprint(ds4_engine *e, const ds4_engine_opts *o, ds4_err *err) {
    /* A file model is named by ds4_gguf_identity: the header, metadata and
     * tensor table plus samples of every tensor's data, so two files of the
     * same recipe with other weights (a re-conversion, a fine-tune) do not
     * share sessions or disk checkpoints. A synthetic model is named by its
     * recipe and seed. */
    if (e->g) {
        if (ds4_gguf_identity(e->g, e->fp)) return ds4_err_set(err, DS4_E_INTERNAL, "SHA-256 failed");
        return 0;
    }
    unsigned int len = 0;
    char syn[96];
    size_t n = (size_t)snprintf(syn, sizeof syn, "ds4 synthetic %s seed %llu", o->synthetic,
                                (unsigned long long)o->synthetic_seed);
    if (!EVP_Digest(syn, n, e->fp, &len, EVP_sha256(), NULL) || len != 32)
        return ds4_err_set(err, DS4_E_INTERNAL, "SHA-256 failed");
    return 0;
}

static void build_describe(ds4_engine *e, const char *path) {
    const ds4_hparams *hp = &e->hp;
    size_t o = 0, cap = sizeof e->describe;
    o += (size_t)snprintf(e->describe + o, cap - o, "model %s", path);
    if (e->have_hp) {
        int ns = 0, ncsa = 0, nhca = 0;
        for (int il = 0; il < hp->n_layer; il++) {
            int r = hp->compress_ratio[il];
            if (r == 0) ns++; else if (r == 4) ncsa++; else nhca++;
        }
        o += (size_t)snprintf(e->describe + o, cap - o,
                              ": DeepSeek V4, %d layers (%d sliding, %d CSA, %d HCA), hidden %d, vocab %d, "
                              "%d heads x %d (rope %d), q_lora %d, o %dx%d, %d experts (%d used, ffn %d, %d hash layers), "
                              "window %d, indexer %dx%d top %d, hc %d, compressed RoPE %s",
                              hp->n_layer, ns, ncsa, nhca, hp->n_embd, hp->n_vocab, hp->n_head, hp->head_dim, hp->n_rot,
                              hp->q_lora, hp->o_groups, hp->o_lora, hp->n_expert, hp->n_expert_used, hp->n_ff_exp,
                              hp->n_hash, hp->window, hp->idx_heads, hp->idx_dim, hp->idx_topk, hp->n_hc,
                              hp->yarn ? "YaRN" : "plain");
        if (o < cap && e->m.weights_loaded) {
            const ds4_layer *l = &e->m.layers[hp->n_layer - 1];
            o += (size_t)snprintf(e->describe + o, cap - o, "; experts %s/%s/%s (last layer), attention %s",
                                  ds4_type_name(l->gate_exps.type), ds4_type_name(l->up_exps.type),
                                  ds4_type_name(l->down_exps.type), ds4_type_name(l->q_a.type));
        }
    }
    if (o < cap && e->bmtp) {
        const ds4_layer *l = &e->mtp.layers[0];
        o += (size_t)snprintf(e->describe + o, cap - o, "; MTP block: experts %s, attention %s, e/h_proj %s",
                              ds4_type_name(l->gate_exps.type), ds4_type_name(l->q_a.type),
                              ds4_type_name(e->mtp.mtp_e_proj.type));
    }
    for (int p = 0; e->n_parts > 1 && p < e->n_parts && o < cap; p++)
        o += (size_t)snprintf(e->describe + o, cap - o, "%s blocks %d-%d", p ? "," : "; layer split:", e->l0[p],
                              e->l1[p] - 1);
    if (o < cap)
        o += (size_t)snprintf(e->describe + o, cap - o, "; tokenizer: %s; backend: %s; numerics: %s",
                              e->tok ? "yes" : "none", e->have_be ? e->be[0].ops->name : "none",
                              e->num.fp8_kv ? "release (FP8 KV, FP4 indexer, f16 cache)" : "plain f32");
}

typedef struct load_progress {
    const ds4_engine_opts *o;
    int64_t base, last; /* bytes of the parts bound before this one; this one's total */
} load_progress;

/* Reports the bytes of all parts bound so far (a split binds part after part). */
static int bind_progress(void *user, int64_t done, int64_t total) {
    load_progress *lp = user;
    lp->last = total;
    return lp->o->progress ? lp->o->progress(lp->o->progress_user, "load", lp->base + done, lp->base + total) : 0;
}

/* Creates backend i of the options' kind (part i of a split). AUTO takes
 * CUDA when this build has it and a device answers, else the CPU. */
static int backend_new(ds4_engine *e, const ds4_engine_opts *opts, int i, ds4_err *err) {
    ds4_backend_kind k = opts->backend;
    ds4_backend *be = &e->be[i];
    if (k == DS4_BACKEND_STRICT) {
        e->host_backend = true;
        return ds4_strict_backend_new(opts->n_threads, be, err);
    }
#ifdef DS4_WITH_CUDA
    if (k == DS4_BACKEND_CUDA || (k == DS4_BACKEND_AUTO && !e->host_backend)) {
        int dev = i < opts->n_devices ? opts->devices[i] : opts->cuda_device + i;
        ds4_cuda_opts co = {.device = dev, .sync_debug = opts->cuda_sync_debug,
                            .no_graphs = opts->cuda_no_graphs, .multi = e->n_parts > 1};
        ds4_err cerr = {0};
        int rc = ds4_cuda_backend_new(&co, be, &cerr);
        if (rc == 0) return 0;
        if (k == DS4_BACKEND_CUDA || e->n_parts > 1) { /* a split wants GPUs unless --cpu says otherwise */
            if (err) *err = cerr;
            return rc;
        }
    }
#else
    if (k == DS4_BACKEND_CUDA || (k == DS4_BACKEND_AUTO && e->n_parts > 1))
        return ds4_err_set(err, DS4_E_ARG, "this build has no CUDA backend (build with `make cuda`; to split the CPU "
                                           "backend use --cpu --split)");
#endif
    e->host_backend = true;
    return ds4_cpu_backend_new(opts->n_threads, be, err);
}

/* The blocks of each part: opts->split_layers when given, else contiguous
 * ranges of about equal weight bytes (the embedding counted on the first
 * part, the head on the last), each at least one block. */
static int plan_split(ds4_engine *e, const ds4_engine_opts *opts, ds4_err *err) {
    const int G = e->n_parts, L = e->hp.n_layer;
    if (G > L) return ds4_err_set(err, DS4_E_ARG, "a split into %d parts needs at least %d blocks (the model has %d)", G, G, L);
    if (opts->split_layers[0] > 0) {
        int sum = 0;
        for (int p = 0; p < G; p++) {
            int c = opts->split_layers[p];
            if (c < 1) return ds4_err_set(err, DS4_E_ARG, "split: part %d has %d blocks (each needs at least 1)", p, c);
            e->l0[p] = sum;
            sum += c;
            e->l1[p] = sum;
        }
        if (sum != L) return ds4_err_set(err, DS4_E_ARG, "split: the parts hold %d blocks, the model has %d", sum, L);
        return 0;
    }
    const ds4_model *m = &e->m;
    double total = 0, head = (double)m->output.mat_bytes + (double)m->out_hc_fn.mat_bytes;
    double lb[4096];
    if (L > 4096) return ds4_err_set(err, DS4_E_ARG, "split: too many blocks");
    for (int il = 0; il < L; il++) total += lb[il] = (double)ds4_model_layer_bytes(m, il);
    total += (double)m->tok_embd.mat_bytes + head;
    double acc = (double)m->tok_embd.mat_bytes;
    int il = 0;
    for (int p = 0; p < G; p++) {
        e->l0[p] = il;
        if (p == G - 1) {
            il = L;
        } else {
            double goal = total * (p + 1) / G;
            il++; /* at least one block */
            acc += lb[il - 1];
            /* take blocks while that brings the part closer to its share and
             * leaves one block for each later part */
            while (il < L - (G - 1 - p) && fabs(acc + lb[il] - goal) < fabs(acc - goal)) acc += lb[il++];
        }
        e->l1[p] = il;
    }
    return 0;
}

/* Creates the backends (one per part) and binds each part's weights. */
static int backends_open(ds4_engine *e, const ds4_engine_opts *opts, ds4_err *err) {
    int rc;
    e->n_parts = opts->n_parts > 1 ? opts->n_parts : 1;
    if (e->n_parts > DS4_FWD_MAX_PARTS)
        return ds4_err_set(err, DS4_E_ARG, "a split into %d parts: at most %d", e->n_parts, DS4_FWD_MAX_PARTS);
    if (opts->n_devices > 0 && (opts->backend == DS4_BACKEND_CPU || opts->backend == DS4_BACKEND_STRICT))
        return ds4_err_set(err, DS4_E_ARG, "--gpus needs the CUDA backend (to split the CPU backend use --split)");
    int given = 0;
    while (given < DS4_FWD_MAX_PARTS && opts->split_layers[given] > 0) given++;
    if (given && given != e->n_parts)
        return ds4_err_set(err, DS4_E_ARG, "--split names %d parts, the engine has %d", given, e->n_parts);
    if (given == 1 && opts->split_layers[0] != e->hp.n_layer)
        return ds4_err_set(err, DS4_E_ARG, "split: the parts hold %d blocks, the model has %d", opts->split_layers[0],
                           e->hp.n_layer);
    const int ranks = opts->n_ranks > 1 ? opts->n_ranks : 1;
    if (ranks > 1 && !opts->rendezvous) return ds4_err_set(err, DS4_E_ARG, "--ranks needs --rendezvous HOST:PORT");
    if (ranks > 1) {
        if (opts->n_devices > 0) return ds4_err_set(err, DS4_E_ARG, "--ranks and --gpus: one part per rank");
        if (given && given != ranks) return ds4_err_set(err, DS4_E_ARG, "--split names %d parts, --ranks %d", given, ranks);
        if (ranks > DS4_FWD_MAX_PARTS) return ds4_err_set(err, DS4_E_ARG, "--ranks %d: at most %d", ranks, DS4_FWD_MAX_PARTS);
        e->n_parts = ranks;
    }
    if (e->n_parts > 1 && (rc = plan_split(e, opts, err))) return rc;
    if (e->n_parts == 1) e->l0[0] = 0, e->l1[0] = e->hp.n_layer;
    e->n_ranks = ranks;
    if (ranks > 1) { /* part 0 here, part r in the worker of rank r */
        ds4_chan *ch[DS4_FWD_MAX_PARTS];
        const int saved = e->n_parts;
        e->n_parts = 1; /* part 0's backend is a single-device one */
        rc = backend_new(e, opts, 0, err);
        e->n_parts = saved;
        if (rc) return rc;
        e->n_be = 1;
        /* workers open the model at rank 0's path (absolute: they may run
         * elsewhere) unless given their own copy, checked against this one */
        char abs_path[4096];
        const char *mpath = opts->model_path && realpath(opts->model_path, abs_path) ? abs_path : opts->model_path;
        char abs_mtp[4096];
        const char *mtp = opts->mtp_path && strcmp(opts->mtp_path, "synthetic") && realpath(opts->mtp_path, abs_mtp)
                              ? abs_mtp
                              : opts->mtp_path;
        ds4_remote_model rm = {.model_path = mpath, .mtp_path = mtp, .synthetic = opts->synthetic,
                               .seed = opts->synthetic_seed, .reply_timeout_s = opts->rank_timeout_s};
        memcpy(rm.fp, e->fp, 32); /* ds4_gguf_identity of the file, or the synthetic recipe and seed */
        rc = ds4_chan_listen(opts->rendezvous, ranks - 1, opts->rank_timeout_s > 0 ? opts->rank_timeout_s : 300, ch,
                             err);
        if (rc) return rc;
        for (int p = 1; p < ranks; p++) {
            if ((rc = ds4_remote_backend_new(ch[p - 1], &rm, &e->be[p], err))) {
                for (int q = p + 1; q < ranks; q++) ds4_chan_close(ch[q - 1]);
                return rc;
            }
            e->n_be = p + 1;
        }
    } else {
        for (int p = 0; p < e->n_parts; p++) {
            if ((rc = backend_new(e, opts, p, err))) return rc;
            e->n_be = p + 1;
            if (e->be[p].ops != e->be[0].ops)
                return ds4_err_set(err, DS4_E_BACKEND, "split: part %d got the %s backend, part 0 the %s one", p,
                                   e->be[p].ops->name, e->be[0].ops->name);
        }
    }
    e->have_be = true;
#ifdef DS4_WITH_CUDA
    if (ranks == 1 && e->n_parts > 1 && !e->host_backend && (rc = ds4_cuda_link_parts(e->be, e->n_parts, err)))
        return rc;
#endif
    if ((rc = e->be[0].ops->check_model(e->be[0].ctx, &e->m, err))) return rc;
    load_progress lp = {.o = opts};
    ds4_bind_opts bo = {.synthetic = opts->synthetic != NULL, .seed = opts->synthetic_seed,
                        .progress = opts->progress ? bind_progress : NULL, .progress_user = &lp};
    for (int p = 0; p < e->n_parts; p++) {
        const ds4_model *host = &e->m;
        if (e->n_parts > 1) {
            if (!(e->part[p] = ds4_model_part(&e->m, e->l0[p], e->l1[p], p == 0, p == e->n_parts - 1)))
                return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
            host = e->part[p];
        }
        lp.last = 0;
        if ((rc = e->be[p].ops->bind_model(e->be[p].ctx, host, &bo, &e->bm[p], err))) {
            if (e->n_parts > 1) ds4_err_prefix(err, "part %d (blocks %d-%d)", p, e->l0[p], e->l1[p] - 1);
            return rc;
        }
        lp.base += lp.last;
    }
    return 0;
}

/* Loads, checks and binds the MTP GGUF beside the main model (beside a
 * synthetic model: path "synthetic", a block of the published recipe).
 * Errors are prefixed with the MTP file's path. */
static int mtp_open(ds4_engine *e, const ds4_engine_opts *o, const char *path, ds4_err *err) {
    int rc;
    const bool syn = o->synthetic != NULL;
    ds4_backend *be = &e->be[e->n_parts - 1]; /* beside the head */
    if (!*path)
        return ds4_err_set(err, DS4_E_ARG, "the MTP file name is empty (--mtp FILE)");
    if (!be->ops->mtp_embed)
        rc = ds4_err_set(err, DS4_E_ARG, "the %s backend does not support MTP yet", be->ops->name);
    else if (syn && strcmp(path, "synthetic") != 0)
        rc = ds4_err_set(err, DS4_E_ARG, "a synthetic model takes only a synthetic MTP block (--mtp synthetic)");
    else if (!(rc = syn ? ds4_model_synth_mtp(&e->mtp, &e->m, o->synthetic_seed, err)
                        : ds4_gguf_open(&e->g_mtp, path, err)) &&
             !(rc = syn ? 0 : ds4_model_load_mtp(&e->mtp, &e->m, e->g_mtp, err)) &&
             !(rc = be->ops->check_model(be->ctx, &e->mtp, err))) {
        ds4_bind_opts bo = {.synthetic = syn, .seed = o->synthetic_seed};
        rc = be->ops->bind_model(be->ctx, &e->mtp, &bo, &e->bmtp, err);
    }
    if (rc) ds4_err_prefix(err, "MTP %s", path);
    return rc;
}

_Static_assert(DS4_FWD_MAX_PARTS == sizeof ((ds4_engine_opts *)0)->devices / sizeof(int), "part limits");

/* Parses "a,b,c" (or one number) into v[], each in lo..hi, at most DS4_FWD_MAX_PARTS. */
static int parse_list(const char *flag, const char *arg, int lo, int hi, int *v, int *n, ds4_err *err) {
    *n = 0;
    const char *p = arg;
    if (!p || !*p) return ds4_err_set(err, DS4_E_ARG, "%s: empty value", flag);
    for (;;) {
        char *end;
        errno = 0;
        long x = *p >= '0' && *p <= '9' ? strtol(p, &end, 10) : (end = (char *)p, 0); /* digits only */
        if (end == p || errno || x < lo || x > hi || (*end && *end != ',') || (*end == ',' && !end[1]))
            return ds4_err_set(err, DS4_E_ARG, "%s: '%s' is not %s %d..%d", flag, arg,
                               !strcmp(flag, "--gpus") || !strcmp(flag, "--split") ? "a list of numbers" : "a number",
                               lo, hi);
        if (*n == DS4_FWD_MAX_PARTS)
            return ds4_err_set(err, DS4_E_ARG, "%s: at most %d parts", flag, DS4_FWD_MAX_PARTS);
        v[(*n)++] = (int)x;
        if (!*end) return 0;
        p = end + 1;
    }
}

int ds4_opts_parse_gpus(ds4_engine_opts *o, const char *arg, ds4_err *err) {
    int v[DS4_FWD_MAX_PARTS], n;
    int rc = parse_list("--gpus", arg, 0, 1023, v, &n, err);
    if (rc) return rc;
    int given = 0;
    while (given < DS4_FWD_MAX_PARTS && o->split_layers[given] > 0) given++;
    int want = n == 1 && !strchr(arg, ',') ? v[0] : n;
    if (given && given != want) return ds4_err_set(err, DS4_E_ARG, "--split names %d parts, --gpus %d", given, want);
    if (n == 1 && !strchr(arg, ',')) { /* a count */
        if (v[0] < 1 || v[0] > DS4_FWD_MAX_PARTS)
            return ds4_err_set(err, DS4_E_ARG, "--gpus: %d GPUs (1..%d)", v[0], DS4_FWD_MAX_PARTS);
        o->n_parts = o->n_devices = v[0];
        for (int i = 0; i < v[0]; i++) o->devices[i] = i;
        return 0;
    }
    o->n_parts = n;
    o->n_devices = n;
    memcpy(o->devices, v, (size_t)n * sizeof(int));
    return 0;
}

int ds4_opts_parse_flag(ds4_engine_opts *o, const char *flag, const char *value, ds4_err *err) {
    const bool known = !strcmp(flag, "--gpus") || !strcmp(flag, "--split") || !strcmp(flag, "--ranks") ||
                       !strcmp(flag, "--rendezvous") || !strcmp(flag, "--rank-timeout");
    if (!known) return 1;
    if (!value) return ds4_err_set(err, DS4_E_ARG, "%s needs a value", flag);
    if (!strcmp(flag, "--gpus")) return ds4_opts_parse_gpus(o, value, err);
    if (!strcmp(flag, "--split")) return ds4_opts_parse_split(o, value, err);
    if (!strcmp(flag, "--rendezvous")) {
        const char *c = strrchr(value, ':');
        char *end;
        long port = c ? strtol(c + 1, &end, 10) : 0;
        if (!c || c == value || !c[1] || c[1] < '0' || c[1] > '9' || *end || port < 1 || port > 65535)
            return ds4_err_set(err, DS4_E_ARG, "--rendezvous '%s': expected HOST:PORT (port 1..65535)", value);
        o->rendezvous = value;
        return 0;
    }
    int v[DS4_FWD_MAX_PARTS], n;
    int rc = parse_list(flag, value, 1, !strcmp(flag, "--ranks") ? DS4_FWD_MAX_PARTS : 86400, v, &n, err);
    if (rc) return rc;
    if (n != 1) return ds4_err_set(err, DS4_E_ARG, "%s takes one number", flag);
    if (!strcmp(flag, "--ranks")) o->n_ranks = v[0];
    else o->rank_timeout_s = v[0];
    return 0;
}

int ds4_opts_check_split(const ds4_engine_opts *o, ds4_err *err) {
    if (o->n_ranks <= 1) return 0;
    if (!o->rendezvous) return ds4_err_set(err, DS4_E_ARG, "--ranks needs --rendezvous HOST:PORT");
    if (o->n_devices > 0) return ds4_err_set(err, DS4_E_ARG, "--ranks and --gpus: one part per rank");
    int given = 0;
    while (given < DS4_FWD_MAX_PARTS && o->split_layers[given] > 0) given++;
    if (given && given != o->n_ranks)
        return ds4_err_set(err, DS4_E_ARG, "--split names %d parts, --ranks %d", given, o->n_ranks);
    return 0;
}

void ds4_opts_copy_split(ds4_engine_opts *dst, const ds4_engine_opts *src) {
    dst->n_parts = src->n_parts;
    dst->n_devices = src->n_devices;
    memcpy(dst->devices, src->devices, sizeof dst->devices);
    memcpy(dst->split_layers, src->split_layers, sizeof dst->split_layers);
    dst->n_ranks = src->n_ranks;
    dst->rendezvous = src->rendezvous;
    dst->rank_timeout_s = src->rank_timeout_s;
}

int ds4_opts_parse_split(ds4_engine_opts *o, const char *arg, ds4_err *err) {
    int v[DS4_FWD_MAX_PARTS], n;
    int rc = parse_list("--split", arg, 1, 1 << 20, v, &n, err);
    if (rc) return rc;
    memset(o->split_layers, 0, sizeof o->split_layers);
    memcpy(o->split_layers, v, (size_t)n * sizeof(int));
    if (o->n_parts <= 1 || o->n_parts == n) o->n_parts = n;
    else return ds4_err_set(err, DS4_E_ARG, "--split names %d parts, --gpus %d", n, o->n_parts);
    return 0;
}

typedef struct worker_factory {
    const ds4_engine_opts *o;
} worker_factory;

static int worker_backend(void *user, ds4_backend *out, ds4_err *err) {
    const ds4_engine_opts *o = ((worker_factory *)user)->o;
    if (o->backend == DS4_BACKEND_STRICT) return ds4_strict_backend_new(o->n_threads, out, err);
#ifdef DS4_WITH_CUDA
    if (o->backend != DS4_BACKEND_CPU) {
        ds4_cuda_opts co = {.device = o->cuda_device, .sync_debug = o->cuda_sync_debug, .no_graphs = o->cuda_no_graphs};
        int rc = ds4_cuda_backend_new(&co, out, err);
        if (rc == 0 || o->backend == DS4_BACKEND_CUDA) return rc;
    }
#else
    if (o->backend == DS4_BACKEND_CUDA)
        return ds4_err_set(err, DS4_E_ARG, "this build has no CUDA backend (build with `make cuda`, or use --cpu)");
#endif
    return ds4_cpu_backend_new(o->n_threads, out, err);
}

int ds4_worker_run(const ds4_engine_opts *o, const char *hostport, int rank, ds4_err *err) {
    if (rank < 1 || rank >= DS4_FWD_MAX_PARTS) return ds4_err_set(err, DS4_E_ARG, "--rank %d: 1..%d", rank, DS4_FWD_MAX_PARTS - 1);
    ds4_chan *ch;
    int rc = ds4_chan_connect(hostport, rank, o->rank_timeout_s > 0 ? o->rank_timeout_s : 300, &ch, err);
    if (rc) return rc;
    worker_factory f = {o};
    rc = ds4_worker_serve(ch, o->model_path, worker_backend, &f, err);
    ds4_chan_close(ch);
    return rc;
}

int ds4_engine_open(ds4_engine **out, const ds4_engine_opts *opts, ds4_err *err) {
    *out = NULL;
    if (!opts || (!opts->model_path && !opts->synthetic)) return ds4_err_set(err, DS4_E_ARG, "no model path given");
    const char *what = opts->synthetic ? "synthetic model" : opts->model_path;
    ds4_engine *e = calloc(1, sizeof *e);
    if (!e) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    int rc = 0;
    bool plain = opts->plain_numerics;
    const unsigned off = opts->numerics_off;
    e->num = (ds4_numerics){.fp8_kv = !plain && !(off & 1), .fp4_indexer = !plain && !(off & 2),
                            .f16_cache = !plain && !(off & 4), .act_quant = !plain && !(off & 8)};
    if (opts->synthetic) {
        if (opts->vocab_only) {
            rc = ds4_err_set(err, DS4_E_ARG, "a synthetic model has no vocabulary file");
            goto fail;
        }
        if ((rc = ds4_model_synth(&e->m, opts->synthetic, opts->synthetic_seed, err))) goto fail;
    } else {
        if ((rc = ds4_gguf_open(&e->g, opts->model_path, err))) goto fail;
        if ((rc = ds4_tokenizer_from_gguf(e->g, &e->tok, err))) goto fail;
    }
    e->vocab_only = opts->vocab_only;
    if (opts->vocab_only) {
        /* hyperparameters are optional here (a tokenizer-only GGUF) */
        ds4_err tmp = {0};
        e->have_hp = ds4_gguf_find_key(e->g, "deepseek4.block_count") >= 0 &&
                     ds4_model_read_hparams(&e->hp, e->g, &tmp) == 0;
        if ((rc = fingerprint(e, opts, err))) goto fail;
    } else {
        if (!opts->synthetic && (rc = ds4_model_load(&e->m, e->g, err))) goto fail;
        e->hp = e->m.hp; /* shallow view; freed with the model */
        e->have_hp = true;
        if (e->tok && ds4_tokenizer_n_vocab(e->tok) > e->hp.n_vocab) {
            rc = ds4_err_set(err, DS4_E_MODEL, "tokenizer has %d tokens but the model's vocab_size is %d",
                             ds4_tokenizer_n_vocab(e->tok), e->hp.n_vocab);
            goto fail;
        }
        if ((rc = fingerprint(e, opts, err))) goto fail; /* workers of a split are checked against it */
        if ((rc = backends_open(e, opts, err))) goto fail;
        if (opts->mtp_path && (rc = mtp_open(e, opts, opts->mtp_path, err))) goto fail;
    }
    if (opts->layer_limit > 0 && e->have_hp && opts->layer_limit > e->hp.n_layer) {
        rc = ds4_err_set(err, DS4_E_ARG, "--layers %d: the model has %d blocks", opts->layer_limit, e->hp.n_layer);
        goto fail;
    }
    e->layer_limit = opts->layer_limit > 0 ? opts->layer_limit : 0;
    build_describe(e, what);
    *out = e;
    return 0;
fail:;
    /* not when the file reader named the file already ("PATH: ...") */
    const size_t wl = strlen(what);
    if (err && !(!strncmp(err->msg, what, wl) && err->msg[wl] == ':' && err->msg[wl + 1] == ' '))
        ds4_err_prefix(err, "%s", what);
    ds4_engine_close(e);
    return rc;
}

void ds4_engine_close(ds4_engine *e) {
    if (!e) return;
    if (e->bmtp) e->be[e->n_parts - 1].ops->unbind_model(e->be[e->n_parts - 1].ctx, e->bmtp);
    if (e->mtp.weights_loaded) ds4_model_free(&e->mtp);
    ds4_gguf_close(e->g_mtp);
    for (int p = 0; p < e->n_be; p++)
        if (e->bm[p]) e->be[p].ops->unbind_model(e->be[p].ctx, e->bm[p]);
    for (int p = 0; p < DS4_FWD_MAX_PARTS; p++) ds4_model_mirror_free(e->part[p]);
    for (int p = e->n_be - 1; p >= 0; p--) e->be[p].ops->destroy(e->be[p].ctx);
    if (e->m.weights_loaded) ds4_model_free(&e->m);
    else if (e->have_hp) ds4_hparams_free(&e->hp);
    ds4_tokenizer_free(e->tok);
    ds4_gguf_close(e->g);
    free(e);
}

int ds4_engine_n_vocab(const ds4_engine *e) {
    if (e->have_hp) return e->hp.n_vocab;
    return e->tok ? ds4_tokenizer_n_vocab(e->tok) : 0;
}
bool ds4_engine_lost_rank(const ds4_engine *e) {
    for (int p = 1; p < e->n_be; p++)
        if (ds4_remote_lost(&e->be[p])) return true;
    return false;
}

int ds4_engine_n_layer(const ds4_engine *e) { return e->have_hp ? e->hp.n_layer : 0; }
const char *ds4_engine_backend_name(const ds4_engine *e) { return e->have_be ? e->be[0].ops->name : "none"; }
const char *ds4_engine_describe(const ds4_engine *e) { return e->describe; }
bool ds4_engine_has_mtp(const ds4_engine *e) { return e->bmtp != NULL; }
void ds4_engine_fingerprint(const ds4_engine *e, uint8_t out[32]) { memcpy(out, e->fp, 32); }
static uint32_t numerics_flags(const ds4_numerics *n);
void ds4_engine_state_id(const ds4_engine *e, uint8_t out[32]) {
    const uint32_t fl = numerics_flags(&e->num);
    unsigned char b[16 + 32 + 4];
    unsigned int len = 0;
    memcpy(out, e->fp, 32);
    if (!fl) return; /* the release path keeps the plain fingerprint (files of earlier versions stay usable) */
    memcpy(b, "ds4 state id v1\0", 16);
    memcpy(b + 16, e->fp, 32);
    memcpy(b + 48, &fl, 4);
    if (!EVP_Digest(b, sizeof b, out, &len, EVP_sha256(), NULL) || len != 32) out[0] ^= 0xff; /* never the plain one */
}

/* ------------------------------------------------------------ tokenizer */

bool ds4_has_tokenizer(const ds4_engine *e) { return e->tok != NULL; }

int32_t ds4_token_special(const ds4_engine *e, ds4_special_token which) {
    return e->tok ? ds4_tokenizer_special(e->tok, (int)which) : -1;
}

int ds4_tokenize(const ds4_engine *e, const char *text, size_t len, bool rendered, int32_t *out, int cap,
                 ds4_err *err) {
    if (!e->tok) return ds4_err_set(err, DS4_E_ARG, "the model has no tokenizer (use token ids)");
    return ds4_tokenizer_encode(e->tok, text, len, rendered, out, cap, err);
}

size_t ds4_token_max_bytes(const ds4_engine *e) { return e->tok ? ds4_tokenizer_max_token_bytes(e->tok) : 0; }

const char *ds4_token_bytes(const ds4_engine *e, int32_t id, size_t *len) {
    if (!e->tok) {
        if (len) *len = 0;
        return NULL;
    }
    return ds4_tokenizer_token_bytes(e->tok, id, len);
}

const char *ds4_token_text(const ds4_engine *e, int32_t id) {
    return e->tok ? ds4_tokenizer_token_text(e->tok, id) : NULL;
}

bool ds4_token_is_control(const ds4_engine *e, int32_t id) {
    return e->tok && ds4_tokenizer_is_control(e->tok, id);
}

int ds4_detok_open(const ds4_engine *e, ds4_detok **out, ds4_err *err) {
    *out = NULL;
    if (!e->tok) return ds4_err_set(err, DS4_E_ARG, "the model has no tokenizer");
    ds4_detok *d = malloc(sizeof *d);
    if (!d) return ds4_err_set(err, DS4_E_NOMEM, "detokenizer: out of memory");
    int rc = ds4_detok_init(d, e->tok, err);
    if (rc) {
        free(d);
        return rc;
    }
    *out = d;
    return 0;
}

void ds4_detok_close(ds4_detok *d) {
    if (!d) return;
    ds4_detok_free(d);
    free(d);
}

/* ------------------------------------------------------------ sessions */

int ds4_session_new(ds4_engine *e, const ds4_session_opts *opts, ds4_session **out, ds4_err *err) {
    *out = NULL;
    if (!e->have_be) return ds4_err_set(err, DS4_E_ARG, "the engine was opened vocab-only: no sessions");
    if (!opts || opts->n_ctx < 1 || opts->n_ctx > (1 << 28))
        return ds4_err_set(err, DS4_E_RANGE, "n_ctx must be in 1..%d", 1 << 28);
    ds4_session *s = calloc(1, sizeof *s);
    if (!s) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    s->e = e;
    s->n_ctx = opts->n_ctx;
    s->hc_pos = -1;
    s->n_batch = opts->prefill_chunk > 0 ? opts->prefill_chunk : DEFAULT_PREFILL_CHUNK;
    if (s->n_batch > s->n_ctx) s->n_batch = s->n_ctx;
    s->tokens = malloc((size_t)s->n_ctx * sizeof(int32_t));
    s->logits = malloc((size_t)e->hp.n_vocab * sizeof(float));
    int rc = 0;
    if (!s->tokens || !s->logits) rc = ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    else {
        ds4_fwd_part parts[DS4_FWD_MAX_PARTS];
        for (int p = 0; p < e->n_parts; p++)
            parts[p] = (ds4_fwd_part){.m = e->bm[p], .be = &e->be[p], .l0 = e->l0[p], .l1 = e->l1[p]};
        rc = ds4_fwd_new_split(parts, e->n_parts, e->num, s->n_ctx, s->n_batch, &s->f, err);
    }
    if (!rc && e->layer_limit) ds4_fwd_set_layer_limit(s->f, e->layer_limit);
    if (!rc && e->moe_fn) rc = ds4_fwd_set_moe_observer(s->f, e->moe_fn, e->moe_user, err);
    if (rc) {
        ds4_session_free(s);
        return rc;
    }
    *out = s;
    return 0;
}

void ds4_session_free(ds4_session *s) {
    if (!s) return;
    for (int i = 0; i < N_CKPT; i++) {
        free(s->ck[i].state);
        free(s->ck[i].logits);
    }
    ds4_fwd_free(s->f);
    ds4_fwd_free(s->mf);
    ds4_sampler_free(s->smp);
    free(s->mtok);
    free(s->row);
    free(s->tokens);
    free(s->logits);
    free(s);
}

int ds4_session_n_ctx(const ds4_session *s) { return s->n_ctx; }
int ds4_session_n_tokens(const ds4_session *s) { return s->n_tokens; }
const int32_t *ds4_session_tokens(const ds4_session *s) { return s->tokens; }

/* Makes s->logits current (copies the row from the backend if needed). */
static int logits_to_host(ds4_session *s, ds4_err *err) {
    if (s->logits_host) return 0;
    int rc = ds4_fwd_logits(s->f, s->logits, err);
    if (rc) return rc;
    /* at least one finite logit (the first one, in any working model) */
    const int V = s->e->hp.n_vocab;
    int i = 0;
    while (i < V && !isfinite(s->logits[i])) i++;
    if (i == V) return ds4_fwd_nonfinite_error(err);
    s->logits_host = true;
    return 0;
}

const float *ds4_session_logits(const ds4_session *s) { return ds4_session_logits_err(s, NULL); }

const float *ds4_session_logits_err(const ds4_session *s, ds4_err *err) {
    if (s->n_tokens <= 0) {
        ds4_err_set(err, DS4_E_ARG, "the session is empty: no logits");
        return NULL;
    }
    /* logically const: the row is only fetched lazily */
    return logits_to_host((ds4_session *)(uintptr_t)s, err) ? NULL : s->logits;
}

int ds4_session_argmax(ds4_session *s, int32_t *id, ds4_err *err) {
    if (s->n_tokens <= 0) return ds4_err_set(err, DS4_E_ARG, "the session is empty: no logits");
    if (s->logits_host) { /* the sampler's greedy rule, which the backends follow */
        *id = ds4_argmax(s->logits, s->e->hp.n_vocab);
        return 0;
    }
    return ds4_fwd_argmax(s->f, id, err);
}

/* Drops checkpoints past position k (their tokens are being replaced). */
static void ckpt_drop_after(ds4_session *s, int k) {
    for (int i = 0; i < N_CKPT; i++)
        if (s->ck[i].pos > k) s->ck[i].pos = 0;
}

static void session_clear(ds4_session *s) {
    s->n_tokens = 0;
    s->logits_host = false;
    ds4_fwd_reset(s->f);
    ckpt_drop_after(s, 0);
    s->hc_pos = -1;
}

static int mtp_feed(ds4_session *s, int pos0, int nr, ds4_err *err);

/* Checkpoints the current state (best effort: skipped when out of memory). */
static void ckpt_take(ds4_session *s) {
    int pos = s->n_tokens;
    if (pos == 0) return;
    ckpt *slot = NULL;
    for (int i = 0; i < N_CKPT; i++) {
        if (s->ck[i].pos == pos) return; /* same prefix, same state */
        if (!slot || s->ck[i].pos == 0 || (slot->pos != 0 && s->ck[i].seq < slot->seq)) slot = &s->ck[i];
    }
    if (!slot->state) {
        slot->state = malloc(ds4_fwd_ckpt_bytes(s->f));
        slot->logits = malloc((size_t)s->e->hp.n_vocab * sizeof(float));
        if (!slot->state || !slot->logits) {
            free(slot->state);
            free(slot->logits);
            slot->state = NULL;
            slot->logits = NULL;
            return;
        }
    }
    if (logits_to_host(s, NULL) || ds4_fwd_ckpt_save(s->f, slot->state, NULL)) {
        slot->pos = 0;
        return;
    }
    memcpy(slot->logits, s->logits, (size_t)s->e->hp.n_vocab * sizeof(float));
    slot->pos = pos;
    slot->seq = ++s->ck_seq;
}

/* The index of the latest checkpoint at or before position k (-1: none). */
static int ckpt_best_upto(const ds4_session *s, int k) {
    int best = -1;
    for (int i = 0; i < N_CKPT; i++)
        if (s->ck[i].pos > 0 && s->ck[i].pos <= k && (best < 0 || s->ck[i].pos > s->ck[best].pos)) best = i;
    return best;
}

/* Tokens tokens[0..n) shares with the session's timeline from the start. */
static int common_prefix(const ds4_session *s, const int32_t *tokens, int n) {
    int lcp = 0;
    while (lcp < n && lcp < s->n_tokens && s->tokens[lcp] == tokens[lcp]) lcp++;
    return lcp;
}

/* Restores the latest checkpoint at or before k (tokens[0..k) must be
 * unchanged); returns its position, or 0 after a reset when none. */
static int ckpt_restore_upto(ds4_session *s, int k) {
    const int bi = ckpt_best_upto(s, k);
    ckpt *best = bi < 0 ? NULL : &s->ck[bi];
    s->hc_pos = -1; /* the MTP's kept state belongs to the old position */
    if (!best || ds4_fwd_ckpt_restore(s->f, best->pos, best->state, NULL)) {
        s->n_tokens = 0;
        s->logits_host = false;
        ds4_fwd_reset(s->f);
        return 0;
    }
    memcpy(s->logits, best->logits, (size_t)s->e->hp.n_vocab * sizeof(float));
    s->logits_host = true;
    s->n_tokens = best->pos;
    return best->pos;
}

static int check_tokens(const ds4_session *s, const int32_t *tokens, int n, ds4_err *err) {
    if (n < 0 || (n > 0 && !tokens)) return ds4_err_set(err, DS4_E_ARG, "bad token array");
    if ((int64_t)s->n_tokens + n > s->n_ctx)
        return ds4_err_set(err, DS4_E_RANGE, "%d + %d tokens exceed the context of %d", s->n_tokens, n, s->n_ctx);
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= s->e->hp.n_vocab)
            return ds4_err_set(err, DS4_E_ARG, "token id %d at index %d is out of range 0..%d", tokens[i], i,
                               s->e->hp.n_vocab - 1);
    return 0;
}

/* Evaluates tokens in batches of `chunk` (<= n_batch), appending them to the
 * timeline. With `align` the batches end at absolute multiples of chunk (the
 * first one is shorter when the timeline does not start at one), so that
 * progress reports land on the positions a checkpoint cadence counts in
 * (SERVING.md C.1); the values are those of any chunking (prefill ==
 * chunked == decode, bit for bit). On failure the session is cleared; when
 * the progress callback cancels, the chunks evaluated so far stay (a
 * client that went away does not cost the cached conversation) and the
 * call returns DS4_E_CANCEL. */
static int eval_chunks(ds4_session *s, const int32_t *tokens, int n, int chunk, bool align, float *all_logits,
                       ds4_progress_fn progress, void *user, ds4_err *err) {
    const size_t V = (size_t)s->e->hp.n_vocab;
    if (chunk < 1 || chunk > s->n_batch) chunk = s->n_batch;
    for (int i = 0, nb; i < n; i += nb) {
        nb = align ? chunk - s->n_tokens % chunk : chunk;
        if (nb > n - i) nb = n - i;
        int rc;
        if (all_logits) {
            rc = ds4_fwd_eval(s->f, tokens + i, nb, all_logits + (size_t)i * V, true, err);
            if (!rc) memcpy(s->logits, all_logits + (size_t)(i + nb - 1) * V, V * sizeof(float));
            s->logits_host = !rc;
        } else {
            rc = ds4_fwd_eval(s->f, tokens + i, nb, NULL, false, err);
            s->logits_host = false; /* fetched when asked for */
        }
        if (rc) {
            session_clear(s);
            return rc;
        }
        memmove(s->tokens + s->n_tokens, tokens + i, (size_t)nb * sizeof(int32_t));
        s->n_tokens += nb;
        if ((rc = mtp_feed(s, s->n_tokens - nb, nb, err))) {
            session_clear(s);
            return rc;
        }
        if (progress && progress(user, "prefill", i + nb, n)) {
            if (i + nb > 1) ckpt_take(s);
            return ds4_err_set(err, DS4_E_CANCEL, "cancelled");
        }
    }
    return 0;
}

int ds4_session_extend(ds4_session *s, const int32_t *tokens, int n, ds4_eval_mode mode, int chunk,
                       float *all_logits, ds4_err *err) {
    int rc = check_tokens(s, tokens, n, err);
    if (rc) return rc;
    int c;
    switch (mode) {
    case DS4_EVAL_PREFILL: c = s->n_batch; break;
    case DS4_EVAL_DECODE: c = 1; break;
    case DS4_EVAL_CHUNKED:
        if (chunk < 1) return ds4_err_set(err, DS4_E_ARG, "chunk size must be >= 1");
        c = chunk < s->n_batch ? chunk : s->n_batch;
        break;
    default: return ds4_err_set(err, DS4_E_ARG, "unknown evaluation mode %d", (int)mode);
    }
    rc = eval_chunks(s, tokens, n, c, false, all_logits, NULL, NULL, err);
    if (!rc && n > 1) ckpt_take(s);
    return rc;
}

int ds4_session_eval(ds4_session *s, int32_t token, ds4_err *err) {
    return ds4_session_extend(s, &token, 1, DS4_EVAL_DECODE, 1, NULL, err);
}

int ds4_session_rewind(ds4_session *s, int n_tokens, ds4_err *err) {
    if (n_tokens < 0 || n_tokens > s->n_tokens)
        return ds4_err_set(err, DS4_E_RANGE, "cannot rewind to %d tokens (session has %d)", n_tokens, s->n_tokens);
    if (n_tokens == s->n_tokens) return 0;
    /* Restore the latest checkpoint at or before the kept prefix (or start
     * over) and re-evaluate the rest: the result is exactly the state of a
     * session that only ever saw the prefix (prefill == decode bitwise).
     * tokens[] is reused as the source while being rewritten in place with
     * the same values. */
    int keep = n_tokens;
    ckpt_drop_after(s, keep);
    int c = ckpt_restore_upto(s, keep);
    if (c == keep) return 0;
    int rc = eval_chunks(s, s->tokens + c, keep - c, s->n_batch, true, NULL, NULL, NULL, err);
    if (!rc && keep - c > 1) ckpt_take(s);
    return rc;
}

int ds4_session_reusable(const ds4_session *s, const int32_t *tokens, int n) {
    if (n < 1 || !tokens) return 0;
    const int lcp = common_prefix(s, tokens, n);
    if (lcp == s->n_tokens) return lcp;
    const int best = ckpt_best_upto(s, lcp); /* what ckpt_restore_upto restores */
    return best < 0 ? 0 : s->ck[best].pos;
}

int ds4_session_sync(ds4_session *s, const int32_t *tokens, int n, ds4_sync_info *info,
                     ds4_progress_fn progress, void *progress_user, ds4_err *err) {
    ds4_sync_info dummy;
    if (!info) info = &dummy;
    info->n_reused = info->n_evaluated = 0;
    if (n < 1 || n > s->n_ctx) {
        session_clear(s);
        return ds4_err_set(err, DS4_E_RANGE, "sync needs 1..%d tokens, got %d", s->n_ctx, n);
    }
    int lcp = common_prefix(s, tokens, n);
    if (lcp == n && n == s->n_tokens) { /* nothing to do: logits are current */
        info->n_reused = n;
        return 0;
    }
    int saved = s->n_tokens;
    s->n_tokens = 0;
    int rc = check_tokens(s, tokens, n, err);
    s->n_tokens = saved;
    if (rc) {
        session_clear(s);
        return rc;
    }
    int c = lcp;
    if (lcp < s->n_tokens) {
        /* the timeline diverges (or shrinks): back to the latest checkpoint
         * inside the common prefix, or to the start */
        ckpt_drop_after(s, lcp);
        c = ckpt_restore_upto(s, lcp);
    }
    info->n_reused = c;
    info->n_evaluated = n - c;
    if (c == n) return 0; /* restored exactly the requested prefix */
    rc = eval_chunks(s, tokens + c, n - c, s->n_batch, true, NULL, progress, progress_user, err);
    if (!rc) ckpt_take(s);
    return rc;
}


/* ------------------------------------------------------------ speculative decoding */

/* Feeds the MTP window after the main model evaluated tokens[pos0 ..
 * pos0+nr) (their final states are rows 0..nr-1 of the main eval): the
 * pending pair (h_{pos0-1}, t_{pos0}) when its state was kept and the MTP
 * has not consumed it yet (the first draft of a cycle does), then
 * (h_i, t_{i+1}) for i = pos0 .. pos0+nr-2; h_{pos0+nr-1} is kept for the
 * next pair. A window that does not continue at these positions (after a
 * rewind, a restore or a load) starts over here: the MTP block then sees a
 * shorter history, which only costs acceptance, never correctness. */
static int mtp_feed(ds4_session *s, int pos0, int nr, ds4_err *err) {
    if (!s->spec || !s->mf || nr < 1) return 0;
    const int cap = ds4_fwd_n_batch(s->mf);
    const bool pend = s->hc_pos == pos0 - 1;
    int next_pair = s->mbase + ds4_fwd_pos(s->mf);
    if (!(pend && next_pair == pos0 - 1) && next_pair != pos0) {
        ds4_fwd_reset(s->mf);
        s->mbase = pend ? pos0 - 1 : pos0;
        next_pair = s->mbase;
    }
    int rc, r = 0, j = 0;
    int32_t *toks = s->mtok; /* (cap + 1): at most cap rows are gathered */
    if (next_pair == pos0 - 1) {
        if ((rc = ds4_fwd_hc_from_kept(s->mf, 0, err))) return rc;
        toks[r++] = s->tokens[pos0];
    }
    /* rows in chunks of the MTP session's batch */
    while (j < nr - 1) {
        int take = nr - 1 - j;
        if (take > cap - r) take = cap - r;
        if ((rc = ds4_fwd_hc_from(s->mf, r, s->f, j, take, err))) return rc;
        for (int i = 0; i < take; i++) toks[r + i] = s->tokens[pos0 + j + i + 1];
        r += take;
        j += take;
        if (r == cap && j < nr - 1) {
            if ((rc = ds4_fwd_eval_states(s->mf, toks, r, err))) return rc;
            r = 0;
        }
    }
    if (r > 0 && (rc = ds4_fwd_eval_states(s->mf, toks, r, err))) return rc;
    if ((rc = ds4_fwd_hc_keep(s->mf, s->f, nr - 1, err))) return rc;
    s->hc_pos = pos0 + nr - 1;
    return 0;
}

int ds4_session_spec_enable(ds4_session *s, const ds4_spec_opts *o, ds4_err *err) {
    ds4_engine *e = s->e;
    if (!o || o->n_draft < 1 || o->n_draft > 4 || !(o->gate >= 0.0f) || o->gate > 1.0f)
        return ds4_err_set(err, DS4_E_RANGE, "speculative decoding needs 1..4 drafts and a gate in [0, 1]");
    if (!e->bmtp && !s->drafter) return ds4_err_set(err, DS4_E_ARG, "the engine has no MTP model (--mtp)");
    const size_t V = (size_t)e->hp.n_vocab;
    if (!s->row) s->row = malloc(V * sizeof(float));
    if (!s->mtok) s->mtok = malloc((size_t)(s->n_batch + 1) * sizeof(int32_t));
    if (!s->smp) s->smp = ds4_sampler_new((int)V, err);
    if (!s->row || !s->mtok || !s->smp)
        return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    if (e->bmtp && !s->mf) {
        int rc = ds4_fwd_new(e->bmtp, &e->be[e->n_parts - 1], e->num, s->n_ctx, s->n_batch, &s->mf, err);
        if (rc) return rc;
        s->hc_pos = -1;
    }
    s->so = *o;
    s->spec = true;
    return 0;
}

void ds4_session_spec_stats(const ds4_session *s, ds4_spec_stats *st) { *st = s->st; }

/* Greedy token and its probability (softmax at temperature 1) of a row. */
static int32_t top_prob(const float *lg, int V, float *p_top) {
    int32_t best = ds4_argmax(lg, V);
    double sum = 0;
    for (int i = 0; i < V; i++)
        if (isfinite(lg[i])) sum += exp((double)lg[i] - (double)lg[best]);
    *p_top = sum > 0 && isfinite(lg[best]) ? (float)(1.0 / sum) : 0.0f;
    return best;
}

/* One MTP draft: evaluates the pair already placed in row 0 of the MTP
 * input with token t. Greedy (sp NULL): *d = the MTP head's greedy token.
 * Sampling: *d is the sampler's draw from the MTP logits under sp with the
 * uniform that the main model's sampler will use at this position (rng is
 * a copy of the request's generator, advanced one draw per drafted
 * position), so a draft is accepted exactly when it is the token the model
 * samples there (coupled draws: ds4_session_spec_step). *ok = false when
 * the gate stops drafting there (top MTP probability at temperature 1
 * below it). */
static int mtp_draft(ds4_session *s, int32_t t, const ds4_sampler_params *sp, ds4_rng *rng, int32_t *d, bool *ok,
                     ds4_err *err) {
    const int V = s->e->hp.n_vocab;
    int rc = ds4_fwd_eval(s->mf, &t, 1, NULL, false, err);
    if (!rc) rc = ds4_fwd_logits_row(s->mf, 0, s->row, err);
    if (rc) return rc;
    float pt;
    *d = top_prob(s->row, V, &pt);
    *ok = pt >= s->so.gate;
    if (sp && *ok) {
        ds4_rng u = *rng; /* the uniform the main sampler will use at this position */
        *d = ds4_sampler_sample(s->smp, s->row, sp, &u);
        ds4_rng_next(rng);
    }
    return 0;
}

/* Up to max drafts for the token `next` at the end of the timeline; sp
 * non-NULL when sampling (MTP drafts are then the sampler's draws with the
 * uniforms of a copy of rng, mtp_draft; rng itself is not advanced). */
static int make_drafts(ds4_session *s, int32_t next, int max, const ds4_sampler_params *sp, ds4_rng *rng,
                       int32_t *drafts, int *nd, ds4_err *err) {
    const int P = s->n_tokens;
    *nd = 0;
    if (max < 1) return 0;
    if (s->drafter) {
        int n = s->drafter(s->drafter_user, s->tokens, P, next, drafts, max);
        if (n < 0 || n > max) return ds4_err_set(err, DS4_E_ARG, "test drafter returned %d drafts (max %d)", n, max);
        for (int i = 0; i < n; i++)
            if (drafts[i] < 0 || drafts[i] >= s->e->hp.n_vocab)
                return ds4_err_set(err, DS4_E_ARG, "test drafter proposed token %d out of range", drafts[i]);
        *nd = n;
        return 0;
    }
    if (!s->mf || s->hc_pos != P - 1) return 0; /* no state to draft from (after a restore): decode */
    /* first draft: the pair (h_{P-1}, next) continues the window */
    if (s->mbase + ds4_fwd_pos(s->mf) != P - 1) {
        ds4_fwd_reset(s->mf);
        s->mbase = P - 1;
    }
    ds4_rng peek;
    if (sp) {
        peek = *rng; /* draft j draws with the main generator's draw j of this cycle (row j's) */
        rng = &peek;
    }
    int rc = ds4_fwd_hc_from_kept(s->mf, 0, err);
    bool ok;
    if (!rc) rc = mtp_draft(s, next, sp, rng, &drafts[0], &ok, err);
    if (rc) return rc;
    if (!ok) {
        s->st.gated++;
        return 0;
    }
    *nd = 1;
    if (max == 1) return 0;
    /* recursive drafts feed the block its own output state; they leave
     * nothing in the window (rolled back) */
    if ((rc = ds4_fwd_spec_begin(s->mf, max - 1, err))) return rc;
    while (*nd < max) {
        if ((rc = ds4_fwd_hc_from(s->mf, 0, s->mf, 0, 1, err))) return rc;
        if ((rc = mtp_draft(s, drafts[*nd - 1], sp, rng, &drafts[*nd], &ok, err)))
            return rc;
        if (!ok) {
            s->st.gated++;
            break;
        }
        (*nd)++;
    }
    return ds4_fwd_spec_rollback(s->mf, 0, err);
}

int ds4_session_spec_step(ds4_session *s, int32_t next, int max_new, const ds4_sampler_params *p, ds4_rng *rng,
                          int32_t *out, int *n_out, int32_t *following, ds4_err *err) {
    *n_out = 0;
    if (!s->spec) return ds4_err_set(err, DS4_E_ARG, "speculative decoding is not enabled on this session");
    const bool greedy = !p || !(p->temperature > 0.0f);
    if (max_new < 1 || !out || !n_out || !following || (!greedy && !rng))
        return ds4_err_set(err, DS4_E_ARG, "bad speculative step arguments");
    int rc = check_tokens(s, &next, 1, err);
    if (rc) return rc;
    const int P = s->n_tokens;
    int max = s->so.n_draft;
    if (max > max_new - 1) max = max_new - 1;
    if (max > s->n_ctx - P - 1) max = s->n_ctx - P - 1;
    if (max > s->n_batch - 1) max = s->n_batch - 1;
    if (max > DS4_FWD_SPEC_MAX - 1) max = DS4_FWD_SPEC_MAX - 1;
    int32_t toks[DS4_FWD_SPEC_MAX], ids[DS4_FWD_SPEC_MAX];
    int nd = 0;
    toks[0] = next;
    if ((rc = make_drafts(s, next, max, greedy ? NULL : p, rng, toks + 1, &nd, err))) goto fail;
    const int nv = nd + 1;
    if (nd > 0 && (rc = ds4_fwd_spec_begin(s->f, nv, err))) goto fail;
    if ((rc = ds4_fwd_eval(s->f, toks, nv, NULL, nd > 0, err))) goto fail;
    int k = 0;
    int32_t fol;
    if (s->n_force > 0) { /* benchmarks: acceptance by a seeded coin, not by the model */
        if ((rc = ds4_fwd_argmax_rows(s->f, ids, err))) goto fail;
        while (k < nd && k < s->n_force && ds4_rng_uniform(&s->force_rng) < s->force_rate[k]) k++;
        fol = ids[k];
    } else if (greedy) {
        if ((rc = ds4_fwd_argmax_rows(s->f, ids, err))) goto fail;
        while (k < nd && ids[k] == toks[k + 1]) k++;
        fol = ids[k];
    } else {
        /* Coupled draws: each row's token is the sampler's draw from the
         * model's logits with the request generator's next uniform, exactly
         * as without drafts; a draft is kept when it equals that token. So
         * the output is the stream of plain sampling with the same seed, bit
         * for bit, whatever was drafted (and whatever the MTP window held:
         * cold or cached prompts give the same text); the MTP drafts with the
         * same uniforms (mtp_draft), so it hits whenever its distribution
         * puts the same token at that uniform. Nothing is drawn that plain
         * sampling would not draw: no token past the caller's max_new, none
         * after an accepted end of sequence (plain generation stops at the
         * draw that gave it), so a generator kept across calls (the REPL's
         * turns) stays in step; *following is then -1. */
        const int32_t eos = ds4_token_special(s->e, DS4_TOK_EOS);
        for (;;) {
            if (k + 1 >= max_new || (k > 0 && toks[k] == eos)) {
                fol = -1;
                break;
            }
            if ((rc = ds4_fwd_logits_row(s->f, k, s->row, err))) goto fail;
            const int32_t t = ds4_sampler_sample(s->smp, s->row, p, rng);
            if (k < nd && t == toks[k + 1]) {
                k++;
                continue;
            }
            fol = t;
            break;
        }
    }
    if (nd > 0 && (rc = ds4_fwd_spec_rollback(s->f, k + 1, err))) goto fail;
    memcpy(s->tokens + P, toks, (size_t)(k + 1) * sizeof(int32_t));
    s->n_tokens = P + k + 1;
    s->logits_host = false;
    if ((rc = mtp_feed(s, P, k + 1, err))) goto fail;
    memcpy(out, toks, (size_t)(k + 1) * sizeof(int32_t));
    *n_out = k + 1;
    *following = fol;
    s->st.cycles++;
    s->st.tokens += k + 1;
    s->st.drafted += nd;
    s->st.accepted += k;
    for (int i = 0; i < nd && i < 4; i++) {
        s->st.pos_drafted[i]++;
        if (i < k) s->st.pos_accepted[i]++;
    }
    return 0;
fail:;
    session_clear(s);
    return rc;
}

/* ------------------------------------------------------------ snapshots */

/* Payload (little-endian):
 *   "DS4SESS\0" | u32 version | u32 numerics flags (bits: 0 no FP8 KV, 1 no FP4
 *   indexer, 2 no f16 cache, 3 no activation quantisation) |
 *   fingerprint[32] | u32 n_vocab | u32 n_layer | u32 n_tokens |
 *   tokens (n_tokens * i32) | logits (n_vocab * f32, when n_tokens > 0) |
 *   u64 state_bytes | state (forward.c layout) | SHA-256 of all the above. */
#define SNAP_MAGIC "DS4SESS"
#define SNAP_VERSION 2u /* 2: cached rows stored as half with the f16 cache */
#define SNAP_HDR (8 + 4 + 4 + 32 + 4 + 4 + 4)

/* Numerics as payload flags: 0 is the release path, 15 --plain-numerics. */
static uint32_t numerics_flags(const ds4_numerics *n) {
    return (n->fp8_kv ? 0u : 1u) | (n->fp4_indexer ? 0u : 2u) | (n->f16_cache ? 0u : 4u) | (n->act_quant ? 0u : 8u);
}

static void put32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }
static uint32_t get32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }

int ds4_session_save(const ds4_session *s, void **out, size_t *out_bytes, ds4_err *err) {
    const ds4_engine *e = s->e;
    const size_t V = (size_t)e->hp.n_vocab, T = (size_t)s->n_tokens;
    size_t st = ds4_fwd_state_bytes(s->f, s->n_tokens);
    size_t total = SNAP_HDR + T * 4 + (T ? V * 4 : 0) + 8 + st + 32;
    unsigned char *b = malloc(total);
    if (!b) return ds4_err_set(err, DS4_E_NOMEM, "out of memory (%zu bytes)", total);
    size_t o = 0;
    memcpy(b, SNAP_MAGIC, 8); o += 8;
    put32(b + o, SNAP_VERSION); o += 4;
    put32(b + o, numerics_flags(&e->num)); o += 4;
    memcpy(b + o, e->fp, 32); o += 32;
    put32(b + o, (uint32_t)V); o += 4;
    put32(b + o, (uint32_t)e->hp.n_layer); o += 4;
    put32(b + o, (uint32_t)T); o += 4;
    memcpy(b + o, s->tokens, T * 4); o += T * 4;
    if (T) {
        int rc = logits_to_host((ds4_session *)(uintptr_t)s, err);
        if (rc) {
            free(b);
            return rc;
        }
        memcpy(b + o, s->logits, V * 4);
        o += V * 4;
    }
    uint64_t st64 = st;
    memcpy(b + o, &st64, 8); o += 8;
    int rc = ds4_fwd_state_save(s->f, b + o, err);
    if (rc) {
        free(b);
        return rc;
    }
    o += st;
    unsigned int len = 0;
    if (!EVP_Digest(b, o, b + o, &len, EVP_sha256(), NULL)) {
        free(b);
        return ds4_err_set(err, DS4_E_INTERNAL, "SHA-256 failed");
    }
    o += 32;
    *out = b;
    *out_bytes = o;
    return 0;
}

int ds4_session_load(ds4_session *s, const void *buf, size_t n_bytes, ds4_err *err) {
    const ds4_engine *e = s->e;
    const unsigned char *b = buf;
    const size_t V = (size_t)e->hp.n_vocab;
    int rc;
    session_clear(s); /* also drops the checkpoints of the old timeline */
#define BAD(...) do { rc = ds4_err_set(err, DS4_E_FORMAT, "session payload: " __VA_ARGS__); goto fail; } while (0)
    if (!b || n_bytes < SNAP_HDR + 8 + 32) BAD("truncated (%zu bytes)", n_bytes);
    if (memcmp(b, SNAP_MAGIC, 8) != 0) BAD("bad magic");
    if (get32(b + 8) != SNAP_VERSION) BAD("version %u, expected %u", get32(b + 8), SNAP_VERSION);
    {
        unsigned char md[32];
        unsigned int len = 0;
        if (!EVP_Digest(b, n_bytes - 32, md, &len, EVP_sha256(), NULL)) BAD("hash failed");
        if (memcmp(md, b + n_bytes - 32, 32) != 0) BAD("checksum mismatch (corrupted or truncated)");
    }
    if (get32(b + 12) != numerics_flags(&e->num)) BAD("saved with other numerics (--plain-numerics or --numerics-off differs)");
    if (memcmp(b + 16, e->fp, 32) != 0) BAD("made by another model (fingerprint mismatch)");
    if (get32(b + 48) != V || get32(b + 52) != (uint32_t)e->hp.n_layer) BAD("model shape mismatch");
    uint32_t T = get32(b + 56);
    if (T > (uint32_t)s->n_ctx) BAD("%u tokens do not fit the session context %d", T, s->n_ctx);
    size_t o = SNAP_HDR;
    size_t need = o + (size_t)T * 4 + (T ? V * 4 : 0) + 8 + 32;
    if (n_bytes < need) BAD("truncated");
    const unsigned char *tok = b + o; o += (size_t)T * 4;
    const unsigned char *lg = b + o; o += T ? V * 4 : 0;
    uint64_t st;
    memcpy(&st, b + o, 8); o += 8;
    if (st != ds4_fwd_state_bytes(s->f, (int)T) || o + st + 32 != n_bytes) BAD("state size mismatch");
    for (uint32_t i = 0; i < T; i++) {
        int32_t id;
        memcpy(&id, tok + 4 * (size_t)i, 4);
        if (id < 0 || (size_t)id >= V) BAD("token %d out of range", id);
        s->tokens[i] = id;
    }
    if ((rc = ds4_fwd_state_load(s->f, (int)T, b + o, (size_t)st, err))) goto fail;
    if (T) memcpy(s->logits, lg, V * 4);
    s->logits_host = T > 0;
    s->n_tokens = (int)T;
    return 0;
#undef BAD
fail:;
    session_clear(s);
    return rc;
}

/* ------------------------------------------------------------ debug */

void ds4_debug_set_numerics(ds4_engine *e, const ds4_debug_numerics *n) {
    e->num = (ds4_numerics){.fp8_kv = n->fp8_kv, .fp4_indexer = n->fp4_indexer, .f16_cache = n->f16_cache,
                            .act_quant = n->act_quant};
}

void ds4_debug_get_numerics(const ds4_engine *e, ds4_debug_numerics *n) {
    *n = (ds4_debug_numerics){.fp8_kv = e->num.fp8_kv, .fp4_indexer = e->num.fp4_indexer,
                              .f16_cache = e->num.f16_cache, .act_quant = e->num.act_quant};
}

const char *ds4_debug_device(ds4_engine *e) {
    if (!e->have_be) return "none";
    size_t o = 0;
    for (int p = 0; p < e->n_parts && o < sizeof e->device; p++) {
        char one[sizeof e->device];
        if (e->be[p].ops->describe) e->be[p].ops->describe(e->be[p].ctx, one, sizeof one);
        else snprintf(one, sizeof one, "%s backend", e->be[p].ops->name);
        if (e->n_parts == 1) o += (size_t)snprintf(e->device + o, sizeof e->device - o, "%s", one);
        else
            o += (size_t)snprintf(e->device + o, sizeof e->device - o, "%spart %d (blocks %d-%d): %s", p ? " | " : "",
                                  p, e->l0[p], e->l1[p] - 1, one);
    }
    return e->device;
}

int ds4_debug_bandwidth(ds4_engine *e, double *gbps, ds4_err *err) {
    if (!e->have_be || !e->be[0].ops->bandwidth)
        return ds4_err_set(err, DS4_E_ARG, "the %s backend cannot measure bandwidth", ds4_engine_backend_name(e));
    return e->be[0].ops->bandwidth(e->be[0].ctx, gbps, err);
}

void ds4_debug_session_profile(ds4_session *s, bool on) { ds4_fwd_set_profile(s->f, on); }

int ds4_debug_profile_read(ds4_engine *e, double *ms, int max) {
    if (!e->have_be || !e->be[0].ops->prof_read) return DS4_E_ARG;
    double sum[DS4_PROF_N] = {0};
    for (int p = 0; p < e->n_parts; p++) { /* the parts run one after another */
        double all[DS4_PROF_N];
        int rc = e->be[p].ops->prof_read(e->be[p].ctx, all);
        if (rc) return rc;
        for (int i = 0; i < DS4_PROF_N; i++) sum[i] += all[i];
    }
    for (int i = 0; i < DS4_PROF_N && i < max; i++) ms[i] = sum[i];
    return DS4_PROF_N;
}

const char *ds4_debug_profile_name(int kind) {
    static const char *names[DS4_PROF_N] = {"embed", "hc_pre", "attn_project", "compress", "indexer", "attention",
                                            "kv_store", "hc_post", "moe_route", "moe_experts", "head", "link"};
    return kind >= 0 && kind < DS4_PROF_N ? names[kind] : "?";
}

int ds4_debug_session_fast_forward(ds4_session *s, int n_tokens, uint64_t seed, ds4_err *err) {
    if (n_tokens < 1 || n_tokens >= s->n_ctx)
        return ds4_err_set(err, DS4_E_RANGE, "fast forward to %d tokens: context is %d", n_tokens, s->n_ctx);
    session_clear(s);
    int rc = ds4_fwd_fast_forward(s->f, n_tokens, seed, err);
    if (rc) {
        session_clear(s);
        return rc;
    }
    uint64_t x = seed | 1;
    for (int i = 0; i < n_tokens; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        s->tokens[i] = (int32_t)(x % (uint64_t)s->e->hp.n_vocab);
    }
    s->n_tokens = n_tokens;
    s->logits_host = true; /* undefined values, but present */
    memset(s->logits, 0, (size_t)s->e->hp.n_vocab * sizeof(float));
    return 0;
}

void ds4_debug_session_drafter(ds4_session *s, ds4_debug_drafter fn, void *user) {
    s->drafter = fn;
    s->drafter_user = user;
}

void ds4_debug_session_force_accept(ds4_session *s, const float *rates, int n, uint64_t seed) {
    s->n_force = n < 0 ? 0 : n > 4 ? 4 : n;
    for (int i = 0; i < s->n_force; i++) s->force_rate[i] = rates[i];
    ds4_rng_seed(&s->force_rng, seed ? seed : 1);
}

int ds4_debug_mtp_eval(ds4_session *s, const float *hc, const int32_t *tokens, int n, float *logits, float *out_hc,
                       ds4_err *err) {
    const ds4_hparams *hp = &s->e->hp;
    const size_t nf = (size_t)hp->n_hc * hp->n_embd, V = (size_t)hp->n_vocab;
    if (!s->mf) return ds4_err_set(err, DS4_E_ARG, "no MTP window: enable speculative decoding with an MTP model");
    for (int i = 0; i < n; i++) {
        if (tokens[i] < 0 || (size_t)tokens[i] >= V) return ds4_err_set(err, DS4_E_ARG, "token %d out of range", tokens[i]);
        int rc = ds4_fwd_hc_upload(s->mf, 0, hc + (size_t)i * nf, 1, err);
        if (!rc) rc = ds4_fwd_eval(s->mf, &tokens[i], 1, NULL, false, err);
        if (!rc && logits) rc = ds4_fwd_logits_row(s->mf, 0, logits + (size_t)i * V, err);
        if (!rc && out_hc) rc = ds4_fwd_state_row(s->mf, 0, out_hc + (size_t)i * nf, err);
        if (rc) return rc;
    }
    s->hc_pos = -1; /* the window no longer follows the timeline */
    return 0;
}

size_t ds4_debug_state_floats(const ds4_engine *e) {
    return e->have_hp ? (size_t)e->hp.n_hc * (size_t)e->hp.n_embd : 0;
}

int ds4_debug_session_state(ds4_session *s, float *hc, ds4_err *err) {
    int n = ds4_fwd_last_n(s->f);
    if (n < 1) return ds4_err_set(err, DS4_E_ARG, "no state: nothing evaluated since the last reset or restore");
    return ds4_fwd_state_row(s->f, n - 1, hc, err);
}

void ds4_debug_set_layer_limit(ds4_engine *e, int n_layers) { e->layer_limit = n_layers < 0 ? 0 : n_layers; }

int ds4_debug_set_moe_observer(ds4_engine *e, ds4_debug_moe_fn fn, void *user, ds4_err *err) {
    if (!e->have_be) return ds4_err_set(err, DS4_E_ARG, "the engine was opened vocab-only: no experts to observe");
    if (fn && (!e->host_backend || e->n_ranks > 1))
        return ds4_err_set(err, DS4_E_ARG, "expert activations can only be observed on the CPU backend (--cpu) "
                                           "with every block in this process (no --ranks)");
    e->moe_fn = fn;
    e->moe_user = user;
    return 0;
}

int ds4_debug_moe_dims(const ds4_engine *e, ds4_debug_moe_shape *out) {
    if (!e->have_be) return DS4_E_ARG;
    *out = (ds4_debug_moe_shape){.n_layer = e->hp.n_layer, .n_embd = e->hp.n_embd, .n_ff = e->hp.n_ff_exp,
                                 .n_expert = e->hp.n_expert, .n_used = e->hp.n_expert_used};
    return 0;
}

/* Bytes one decode step reads (PERFORMANCE.md A.3-A.4), by profile stage:
 * weights w (every dense weight, n_expert_used of each expert stack, one
 * embedding row; the indexer query projections only once a CSA layer holds
 * more than top_k rows) and cache rows k (the raw window of every layer,
 * all indexer keys and the selected rows of CSA layers, all compressed rows
 * of HCA layers, in the backend's row type). */
static void stage_bytes(ds4_engine *e, int ctx, double w[DS4_PROF_N], double k[DS4_PROF_N]) {
    const ds4_model *m = &e->m;
    const ds4_hparams *hp = &m->hp;
    for (int i = 0; i < DS4_PROF_N; i++) w[i] = k[i] = 0;
    const double elem = e->have_be && e->be[0].ops->kv_row_type(e->be[0].ctx, e->num) == DS4_TYPE_F16 ? 2 : 4;
#define WB(x) ((x).n_in > 0 ? (double)(x).mat_bytes * (double)(x).n_mat : 0.0)
    w[DS4_PROF_EMBED] += (double)m->tok_embd.row_bytes;
    w[DS4_PROF_HEAD] += WB(m->out_hc_fn) + WB(m->output);
    k[DS4_PROF_LINK] = (double)(e->n_parts - 1) * hp->n_hc * hp->n_embd * sizeof(float); /* sent, not read */
    for (int il = 0; il < hp->n_layer; il++) {
        const ds4_layer *l = &m->layers[il];
        w[DS4_PROF_HC_PRE] += WB(l->hc_attn_fn) + WB(l->hc_ffn_fn);
        w[DS4_PROF_ATTN_PROJECT] += WB(l->q_a) + WB(l->q_b) + WB(l->kv);
        w[DS4_PROF_ATTENTION] += WB(l->o_a) + WB(l->o_b);
        w[DS4_PROF_COMPRESS] += WB(l->comp_ape) + WB(l->comp_kv) + WB(l->comp_gate) + WB(l->icomp_ape) +
                                WB(l->icomp_kv) + WB(l->icomp_gate);
        w[DS4_PROF_MOE_ROUTE] += WB(l->gate_inp);
        w[DS4_PROF_MOE_EXPERTS] += WB(l->gate_sh) + WB(l->up_sh) + WB(l->down_sh);
        if (l->kind == DS4_ATTN_CSA && ctx / 4 > hp->idx_topk) w[DS4_PROF_INDEXER] += WB(l->idx_q_b) + WB(l->idx_proj);
        const double frac = (double)hp->n_expert_used / (double)hp->n_expert;
        w[DS4_PROF_MOE_EXPERTS] += frac * (WB(l->gate_exps) + WB(l->up_exps) + WB(l->down_exps));
        double rows = ctx < hp->window ? ctx : hp->window;
        if (l->kind == DS4_ATTN_CSA) {
            int nc = ctx / 4;
            rows += nc < hp->idx_topk ? nc : hp->idx_topk;
            k[DS4_PROF_INDEXER] += (double)nc * hp->idx_dim * elem;
        } else if (l->kind == DS4_ATTN_HCA) {
            rows += ctx / l->ratio;
        }
        k[DS4_PROF_ATTENTION] += rows * hp->head_dim * elem;
    }
#undef WB
}

int ds4_debug_decode_bytes(ds4_engine *e, int ctx, double *weight_bytes, double *kv_bytes) {
    if (!e->m.weights_loaded) return DS4_E_ARG;
    double w[DS4_PROF_N], k[DS4_PROF_N], wb = 0, kb = 0;
    stage_bytes(e, ctx, w, k);
    for (int i = 0; i < DS4_PROF_N; i++)
        if (i != DS4_PROF_LINK) wb += w[i], kb += k[i]; /* link bytes are sent, not read from memory */
    *weight_bytes = wb;
    *kv_bytes = kb;
    return 0;
}

int ds4_debug_stage_bytes(ds4_engine *e, int ctx, double *bytes, int max) {
    if (!e->m.weights_loaded) return DS4_E_ARG;
    double w[DS4_PROF_N], k[DS4_PROF_N];
    stage_bytes(e, ctx, w, k);
    for (int i = 0; i < DS4_PROF_N && i < max; i++) bytes[i] = w[i] + k[i];
    return DS4_PROF_N;
}

/* Multiply-adds x2 of one token at position pos (A.7) by profile stage:
 * every matmul weight of the token's path (6 experts) plus attention (QK
 * and PV over the visible rows) and the indexer scan. */
static void stage_flops(ds4_engine *e, int pos, double f[DS4_PROF_N]) {
    const ds4_model *m = &e->m;
    const ds4_hparams *hp = &m->hp;
    for (int i = 0; i < DS4_PROF_N; i++) f[i] = 0;
#define MAC(w) ((w).n_in > 0 ? (double)(w).n_in * (double)(w).n_out : 0.0)
    f[DS4_PROF_HEAD] += 2 * MAC(m->out_hc_fn);
    for (int il = 0; il < hp->n_layer; il++) {
        const ds4_layer *l = &m->layers[il];
        f[DS4_PROF_HC_PRE] += 2 * (MAC(l->hc_attn_fn) + MAC(l->hc_ffn_fn));
        f[DS4_PROF_ATTN_PROJECT] += 2 * (MAC(l->q_a) + MAC(l->q_b) + MAC(l->kv));
        f[DS4_PROF_ATTENTION] += 2 * (MAC(l->o_a) + MAC(l->o_b));
        f[DS4_PROF_COMPRESS] += 2 * (MAC(l->comp_kv) + MAC(l->comp_gate) + MAC(l->icomp_kv) + MAC(l->icomp_gate));
        f[DS4_PROF_INDEXER] += 2 * (MAC(l->idx_q_b) + MAC(l->idx_proj));
        f[DS4_PROF_MOE_ROUTE] += 2 * MAC(l->gate_inp);
        f[DS4_PROF_MOE_EXPERTS] += 2 * (MAC(l->gate_sh) + MAC(l->up_sh) + MAC(l->down_sh)) +
                                   2 * (double)hp->n_expert_used * (MAC(l->gate_exps) + MAC(l->up_exps) + MAC(l->down_exps));
        double rows = pos + 1 < hp->window ? pos + 1 : hp->window;
        if (l->kind == DS4_ATTN_CSA) {
            int nc = (pos + 1) / 4;
            rows += nc < hp->idx_topk ? nc : hp->idx_topk;
            f[DS4_PROF_INDEXER] += 2.0 * hp->idx_heads * hp->idx_dim * nc;
        } else if (l->kind == DS4_ATTN_HCA) {
            rows += (pos + 1) / l->ratio;
        }
        f[DS4_PROF_ATTENTION] += 4.0 * hp->n_head * hp->head_dim * rows;
    }
#undef MAC
}

double ds4_debug_token_flops(ds4_engine *e, int pos) {
    double f[DS4_PROF_N], t = 0;
    stage_flops(e, pos, f);
    for (int i = 0; i < DS4_PROF_N; i++) t += f[i];
    return t;
}

int ds4_debug_stage_flops(ds4_engine *e, int pos, double *flops, int max) {
    double f[DS4_PROF_N];
    stage_flops(e, pos, f);
    for (int i = 0; i < DS4_PROF_N && i < max; i++) flops[i] = f[i];
    return DS4_PROF_N;
}

size_t ds4_debug_session_state_bytes(const ds4_session *s) { return ds4_fwd_state_bytes(s->f, s->n_tokens); }
