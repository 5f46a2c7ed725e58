/* cuda_backend.cu - the CUDA backend's context and everything that is not a
 * model stage: errors, device memory, transfers, binding the model (upload
 * with the Q8_0/IQ2_XXS repack, or synthetic fill on the device), scratch
 * reservation, steps with CUDA-graph capture and replay, argmax, and the
 * vtable (backend.h). Stages live in ops_*.cu.
 *
 * Steps and graphs: decode steps of a session carry a graph key
 * (forward.c). The first step with a key is captured from the stream while
 * it is issued, instantiated and launched; later steps with the key launch
 * the instantiated graph and issue nothing. This is valid because every
 * stage kernel reads positions and counts from the device step
 * (ds4_step) and takes every position-dependent decision on the device, and
 * all scratch is reserved before any step (reserve). Growing the scratch
 * drops every graph.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <limits.h>
#include <string.h>

#include "cuda/cuda.cuh"
#include "cuda/quant.cuh"

#include "synth.h"

/* ---------------------------------------------------------------- errors */

void cu_fail(cu_ctx *c, int code, const char *fmt, ...) {
    if (c->err) return;
    c->err = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->msg, sizeof c->msg, fmt, ap);
    va_end(ap);
}

bool cu_ok(cu_ctx *c, cudaError_t e, const char *what) {
    if (e == cudaSuccess) return true;
    cu_fail(c, e == cudaErrorMemoryAllocation ? DS4_E_NOMEM : DS4_E_BACKEND, "cuda: %s: %s", what,
            cudaGetErrorString(e));
    return false;
}

static void prof_mark(void *ctx, int kind);
static void nccl_comm_destroy(void *comm);

/* Index of a kernel name in the per-kernel profile (names are literals). */
static int kprof_index(cu_ctx *c, const char *name) {
    for (int i = 0; i < c->n_kp; i++)
        if (c->kp[i].name == name || !strcmp(c->kp[i].name, name)) return i;
    if (c->n_kp == (int)(sizeof c->kp / sizeof c->kp[0])) return -1;
    c->kp[c->n_kp].name = name;
    c->kp[c->n_kp].ms = 0.0;
    c->kp[c->n_kp].calls = 0;
    return c->n_kp++;
}

void cu_twice_mark(cu_ctx *c) {
    if (!c->kprof || c->n_prof <= 0) return;
    const int i = kprof_index(c, "(first launches)");
    if (i >= 0) prof_mark(c, CU_KPROF_BASE + i);
}

bool cu_launched(cu_ctx *c, const char *kernel) {
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return cu_ok(c, e, kernel);
    if (c->kprof && c->n_prof > 0 && !c->capturing) {
        int i = kprof_index(c, kernel);
        if (i >= 0) prof_mark(c, CU_KPROF_BASE + i);
    }
    if (c->sync_debug && !c->capturing) return cu_ok(c, cudaStreamSynchronize(c->st), kernel);
    return true;
}

/* ---------------------------------------------------------------- weights */

static size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

size_t cu_scale_offset(const ds4_weight *w) {
    size_t rows = (size_t)w->n_out * (size_t)w->n_mat;
    size_t nb = (size_t)w->n_in / (size_t)ds4_type_get(w->type)->block_elems;
    return align256(rows * nb * cu_payload_block(w->type));
}

size_t cu_weight_bytes(const ds4_weight *w) {
    if (!cu_planar(w->type)) return w->mat_bytes * (size_t)w->n_mat;
    size_t rows = (size_t)w->n_out * (size_t)w->n_mat;
    size_t nb = (size_t)w->n_in / (size_t)ds4_type_get(w->type)->block_elems;
    return cu_scale_offset(w) + rows * nb * 2;
}

cu_w cu_weight_view(const ds4_weight *w) {
    cu_w v;
    const ds4_type_traits *t = ds4_type_get(w->type);
    size_t nb = (size_t)w->n_in / (size_t)t->block_elems;
    v.type = w->type;
    v.n_in = (int)w->n_in;
    v.rows_per_mat = w->n_out;
    v.q = (const uint8_t *)w->data;
    if (cu_planar(w->type)) {
        v.q_row = nb * cu_payload_block(w->type);
        v.s = (const uint8_t *)w->data + cu_scale_offset(w);
        v.s_row = nb * 2;
    } else {
        v.q_row = w->row_bytes;
        v.s = nullptr;
        v.s_row = 0;
    }
    return v;
}

cu_w cu_weight_rows(const ds4_weight *w, int64_t mat, int64_t row0) {
    cu_w v = cu_weight_view(w);
    int64_t r = mat * w->n_out + row0;
    v.q += (size_t)r * v.q_row;
    if (v.s) v.s += (size_t)r * v.s_row;
    return v;
}

/* ---------------------------------------------------------------- memory */

static void *cu_alloc_op(void *ctx, size_t bytes) {
    cu_ctx *c = (cu_ctx *)ctx;
    void *p = nullptr;
    if (cudaMalloc(&p, bytes ? bytes : 1) != cudaSuccess) {
        cudaGetLastError();
        return nullptr;
    }
    if (cudaMemsetAsync(p, 0, bytes ? bytes : 1, c->st) != cudaSuccess || cudaStreamSynchronize(c->st) != cudaSuccess) {
        cudaGetLastError();
        cudaFree(p);
        return nullptr;
    }
    return p;
}

static void cu_join(cu_ctx *c);

static void cu_free_op(void *ctx, void *p) {
    cu_ctx *c = (cu_ctx *)ctx;
    if (!p) return;
    cu_join(c); /* pending work (a deferred comb, the side stream) may write it */
    cudaStreamSynchronize(c->st);
    cudaFree(p);
}

static int report(cu_ctx *c, ds4_err *err) {
    int e = c->err;
    c->err = 0;
    return ds4_err_set(err, e, "%s", c->msg);
}

/* ---------------------------------------------------------------- side stream
 *
 * On by default (DS4_CUDA_NO_SIDE_STREAM=1 turns it off; measured on the
 * H200, q2 at 2k: decode 93.4 -> 97.3 tok/s gen_ss, same bits): the
 * compressors (compress_update) read
 * only HC-pre's output and write only their own state and scratch (s.ca,
 * s.cg, s.ac), so they run on a second stream, forked after each HC-pre
 * (event ev_fork) while attn_project runs on the main one, and every other
 * operation first joins it (ev_join). In a captured step the fork and join
 * are graph edges. Off when profiling or synchronising each launch. */
static bool side_on(const cu_ctx *c) { return !c->no_side_stream && c->st2 && !c->profile && !c->kprof && !c->sync_debug; }

static void cu_join(cu_ctx *c) {
    /* a comb HC-pre left for later, before anything that may read it
     * (DS4_CUDA_COMB_HOST=1; the q/kv finish and the router take it) */
    cu_comb_flush(c);
    if (!c->side_live) return;
    c->side_live = false;
    cu_ok(c, cudaEventRecord(c->ev_join, c->st2), "side stream join") &&
        cu_ok(c, cudaStreamWaitEvent(c->st, c->ev_join, 0), "side stream join");
}

/* ---------------------------------------------------------------- L2 ahead (cuda.cuh cu_ahead) */

#define AHEAD_MAX 8
#define AHEAD_CHUNK ((size_t)256 << 10)
struct ahead_p {
    int n;
    const char *p[AHEAD_MAX];
    size_t b[AHEAD_MAX];
};

/* Block i issues the bulk prefetches of chunks i, i + gridDim.x, ... of the
 * ranges laid end to end (one thread: the SM's TMA unit does the work). */
__global__ void k_l2_ahead(const __grid_constant__ ahead_p p) {
    if (threadIdx.x) return;
    size_t base = 0;
    for (int r = 0; r < p.n; r++) {
        const size_t nch = (p.b[r] + AHEAD_CHUNK - 1) / AHEAD_CHUNK;
        /* chunk i of this range is chunk base + i of all */
        for (size_t i = (blockIdx.x + gridDim.x - base % gridDim.x) % gridDim.x; i < nch; i += gridDim.x) {
            const size_t off = i * AHEAD_CHUNK, len = p.b[r] - off < AHEAD_CHUNK ? p.b[r] - off : AHEAD_CHUNK;
            cu_prefetch_l2(p.p[r] + off, len);
        }
        base += nch;
    }
}

static void cu_join_ahead(cu_ctx *c) {
    if (!c->ahead_live) return;
    c->ahead_live = false;
    cu_ok(c, cudaEventRecord(c->ev_aj, c->st3), "L2-ahead join") &&
        cu_ok(c, cudaStreamWaitEvent(c->st, c->ev_aj, 0), "L2-ahead join");
}

void cu_ahead(cu_ctx *c, int bit, const ds4_weight *const *ws, int nw, int n_tokens) {
    if (!(c->l2ahead & bit) || !c->st3 || n_tokens > 8 || c->err || c->profile || c->kprof || c->sync_debug) return;
    ahead_p p;
    p.n = 0;
    size_t chunks = 0;
    for (int i = 0; i < nw && p.n < AHEAD_MAX; i++) {
        const ds4_weight *w = ws[i];
        /* a layer split's parts hollow the weights of other parts (ds4_model_part); the weights named
         * here are never the routed experts, the only ones that may stay in host memory */
        if (!w || !w->data || w->n_in <= 0) continue;
        p.p[p.n] = (const char *)w->data;
        p.b[p.n] = cu_weight_bytes(w);
        chunks += (p.b[p.n] + AHEAD_CHUNK - 1) / AHEAD_CHUNK;
        p.n++;
    }
    if (!p.n || !chunks) return;
    const int grid = (int)(chunks < (size_t)c->n_sm ? chunks : (size_t)c->n_sm);
    if (!cu_ok(c, cudaEventRecord(c->ev_af, c->st), "L2-ahead fork") ||
        !cu_ok(c, cudaStreamWaitEvent(c->st3, c->ev_af, 0), "L2-ahead fork"))
        return;
    k_l2_ahead<<<grid, 32, 0, c->st3>>>(p);
    cu_ok(c, cudaGetLastError(), "L2-ahead launch");
    c->ahead_live = true;
}

#define CU_JOINED(op, T)                                                                                \
    static int op##_j(void *ctx, const T *a) {                                                          \
        cu_join((cu_ctx *)ctx);                                                                         \
        return op(ctx, a);                                                                              \
    }
CU_JOINED(cu_embed, ds4_embed_args)
CU_JOINED(cu_kv_store, ds4_kv_store_args)
CU_JOINED(cu_hc_post, ds4_hc_post_args)
CU_JOINED(cu_head, ds4_head_args)
CU_JOINED(cu_mtp_embed, ds4_mtp_embed_args)
#undef CU_JOINED

/* The indexer. DS4_CUDA_IDX_FORK (default 1; 0 turns it off): for up to 4
 * tokens, its query path (the q and weights projections and k_idx_q, which
 * read only the q_a norm's output and HC-pre's) runs on a stream of its own
 * forked after the q_a norm (ev_qa, cu_attn_project), so that it overlaps
 * q_b, the q/kv finish and the compressors; the scores and the top-k then
 * wait for it (ev_iq) and for the compressors (cu_join) on the main stream.
 * The H100 timeline of a CSA layer (thirtieth session) had the query path
 * start after the q/kv finish and the compressors: ~14 us of it, and the
 * ~15 us of scores + top-k, before the attention. Only with float indexer
 * weights: their matvecs quantize nothing, so the path writes only the
 * indexer's own scratch (s.qi, s.wt, s.qc, s.qp). The same kernels with the
 * same inputs: the same bits. */
static int cu_indexer_select_j(void *ctx, const ds4_indexer_args *a) {
    cu_ctx *c = (cu_ctx *)ctx;
    const bool fork = c->idx_fork && c->qa_live && c->st4 && side_on(c) && a->n <= 4 &&
                      cu_act_type(a->l->idx_q_b.type) < 0 && cu_act_type(a->l->idx_proj.type) < 0;
    c->qa_live = false;
    if (!fork) {
        cu_join(c);
        return cu_indexer_select(ctx, a);
    }
    if (c->err) return c->err;
    if (!cu_ok(c, cudaStreamWaitEvent(c->st4, c->ev_qa, 0), "indexer fork")) return c->err;
    cudaStream_t main_st = c->st;
    c->st = c->st4;
    cu_indexer_q(c, a);
    c->st = main_st;
    /* joined whatever happened, so that a capture never ends with the stream open */
    cu_ok(c, cudaEventRecord(c->ev_iq, c->st4), "indexer join");
    cu_ok(c, cudaStreamWaitEvent(c->st, c->ev_iq, 0), "indexer join");
    cu_join(c);
    return cu_indexer_scores(c, a);
}

/* cu_join, but a pending comb stays pending (for a kernel of this op to host) */
static void cu_join_keep_comb(cu_ctx *c) {
    const cu_comb_job j = cu_comb_take(c);
    cu_join(c);
    c->comb_job = j;
}

/* the router joins the side stream but leaves a pending comb to its own
 * launch (k_route's spare block) */
static int cu_moe_route_j(void *ctx, const ds4_moe_route_args *a) {
    cu_join_keep_comb((cu_ctx *)ctx);
    return cu_moe_route(ctx, a);
}

/* Attention: o_a into L2 while the attention core runs; afterwards the
 * FFN's shared expert and router while HC-pre and the router run. */
static int cu_attention_j(void *ctx, const ds4_attention_args *a) {
    cu_ctx *c = (cu_ctx *)ctx;
    cu_join(c);
    const ds4_weight *oa[] = {&a->l->o_a};
    cu_ahead(c, CU_AHEAD_OA, oa, 1, a->n);
    const int rc = cu_attention(ctx, a);
    const ds4_weight *ffn[] = {&a->l->gate_sh, &a->l->up_sh, &a->l->down_sh, &a->l->gate_inp};
    if (!rc) cu_ahead(c, CU_AHEAD_FFN, ffn, 4, a->n);
    return rc ? rc : c->err;
}

/* Experts, then the next layer's first projections into L2 while its
 * HC-pre runs. */
static int cu_moe_experts_j(void *ctx, const ds4_moe_experts_args *a) {
    cu_ctx *c = (cu_ctx *)ctx;
    /* a comb the router left pending (DS4_CUDA_COMB_BIG) goes to the fused
     * gate/up launch; not taken there, the next join launches it */
    cu_join_keep_comb(c);
    const int rc = cu_moe_experts(ctx, a);
    if (!rc && a->il + 1 < a->m->hp.n_layer) {
        const ds4_layer *nl = &a->m->layers[a->il + 1];
        const ds4_weight *nx[] = {&nl->hc_attn_fn, &nl->q_a, &nl->kv}, *qb[] = {&nl->q_b};
        cu_ahead(c, CU_AHEAD_NEXT, nx, 3, a->n);
        cu_ahead(c, CU_AHEAD_QB, qb, 1, a->n);
    }
    return rc ? rc : c->err;
}

/* HC-pre, then the fork point of the compressors that may follow */
static int cu_hc_pre_j(void *ctx, const ds4_hc_pre_args *a) {
    cu_ctx *c = (cu_ctx *)ctx;
    cu_join(c);
    const int rc = cu_hc_pre(ctx, a);
    if (!rc && side_on(c)) cu_ok(c, cudaEventRecord(c->ev_fork, c->st), "side stream fork");
    return rc ? rc : c->err;
}

/* a compressor on the side stream (after the last HC-pre), else in order */
static int cu_compress_update_s(void *ctx, const ds4_compress_args *a) {
    cu_ctx *c = (cu_ctx *)ctx;
    if (!side_on(c)) return cu_compress_update(ctx, a);
    if (!c->side_live) {
        if (!cu_ok(c, cudaStreamWaitEvent(c->st2, c->ev_fork, 0), "side stream fork")) return c->err;
        c->side_live = true;
    }
    cudaStream_t main_st = c->st;
    c->st = c->st2;
    const int rc = cu_compress_update(ctx, a);
    c->st = main_st;
    return rc;
}

static int cu_upload_op(void *ctx, void *dst, const void *src, size_t bytes, ds4_err *err) {
    cu_ctx *c = (cu_ctx *)ctx;
    cu_join(c);
    c->moe_grouped = nullptr;
    if (!bytes) return 0;
    if (!cu_ok(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->st), "upload")) return report(c, err);
    return 0;
}

static int cu_download_op(void *ctx, void *dst, const void *src, size_t bytes, ds4_err *err) {
    cu_ctx *c = (cu_ctx *)ctx;
    cu_join(c);
    if (!bytes) return 0;
    if (!cu_ok(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c->st), "download") ||
        !cu_ok(c, cudaStreamSynchronize(c->st), "download"))
        return report(c, err);
    return 0;
}

static int cu_copy_op(void *ctx, void *dst, const void *src, size_t bytes, ds4_err *err) {
    cu_ctx *c = (cu_ctx *)ctx;
    cu_join(c);
    c->moe_grouped = nullptr;
    if (!bytes) return 0;
    if (!cu_ok(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, c->st), "copy")) return report(c, err);
    return 0;
}

/* copy_many: one block per copy, the descriptors passed by value (one
 * launch for the ~430 ring runs of a speculative save or restore). */
#define CU_COPY_MAX 64
struct copy_many_p {
    int n;
    void *dst[CU_COPY_MAX];
    const void *src[CU_COPY_MAX];
    size_t bytes[CU_COPY_MAX];
};

__global__ void k_copy_many(const __grid_constant__ copy_many_p p) {
    const int i = blockIdx.x;
    unsigned char *d = (unsigned char *)p.dst[i];
    const unsigned char *s = (const unsigned char *)p.src[i];
    const size_t nb = p.bytes[i];
    if ((((uintptr_t)d | (uintptr_t)s | nb) & 15) == 0) {
        for (size_t k = threadIdx.x; k < nb / 16; k += blockDim.x) ((uint4 *)d)[k] = ((const uint4 *)s)[k];
    } else if ((((uintptr_t)d | (uintptr_t)s | nb) & 3) == 0) {
        for (size_t k = threadIdx.x; k < nb / 4; k += blockDim.x) ((uint32_t *)d)[k] = ((const uint32_t *)s)[k];
    } else {
        for (size_t k = threadIdx.x; k < nb; k += blockDim.x) d[k] = s[k];
    }
}

static int cu_copy_many_op(void *ctx, const ds4_copy *v, int n, ds4_err *err) {
    cu_ctx *c = (cu_ctx *)ctx;
    cu_join(c);
    c->moe_grouped = nullptr;
    for (int i0 = 0; i0 < n; i0 += CU_COPY_MAX) {
        copy_many_p p;
        p.n = n - i0 < CU_COPY_MAX ? n - i0 : CU_COPY_MAX;
        for (int i = 0; i < p.n; i++) {
            p.dst[i] = v[i0 + i].dst;
            p.src[i] = v[i0 + i].src;
            p.bytes[i] = v[i0 + i].bytes;
        }
        k_copy_many<<<p.n, 256, 0, c->st>>>(p);
        if (!cu_ok(c, cudaGetLastError(), "copy")) return report(c, err);
    }
    return 0;
}

/* ---------------------------------------------------------------- binding */

static bool track(void ***arr, int *n, int *cap, void *p) {
    if (*n == *cap) {
        int nc = *cap ? 2 * *cap : 1024;
        void **na = (void **)realloc(*arr, (size_t)nc * sizeof(void *));
        if (!na) return false;
        *arr = na;
        *cap = nc;
    }
    (*arr)[(*n)++] = p;
    return true;
}

/* Repacks `nblk` raw blocks (GGUF bytes, blk bytes each) of a planar type
 * starting at block index b0 of the tensor into its two planes. */
__global__ void k_repack(const uint8_t *raw, int64_t nblk, int blk, int pay, uint8_t *q, uint8_t *s, int64_t b0) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nblk) return;
    const uint8_t *r = raw + i * blk;
    uint8_t *qd = q + (b0 + i) * pay;
    uint8_t *sd = s + (b0 + i) * 2;
    sd[0] = r[0];
    sd[1] = r[1];
    for (int k = 0; k < pay; k++) qd[k] = r[2 + k];
}

/* Fills blocks [0, nblk) of a weight with synth.h values in the device
 * layout. */
__global__ void k_synth(int type, uint64_t key, float std, int64_t nblk, int blk, uint8_t *q, uint8_t *s, bool planar,
                        int pay) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nblk) return;
    uint8_t b[160];
    ds4_synth_block(type, key, (uint64_t)i, std, b);
    if (planar) {
        s[2 * i] = b[0];
        s[2 * i + 1] = b[1];
        for (int k = 0; k < pay; k++) q[i * pay + k] = b[2 + k];
    } else {
        for (int k = 0; k < blk; k++) q[i * blk + k] = b[k];
    }
}

/* Upload pipeline: workers copy chunks of the mapping into pinned staging
 * buffers and send them to the device on their own streams; chunks of
 * planar tensors land in a per-worker device buffer and are repacked. */
#define UP_WORKERS 8
#define UP_CHUNK ((size_t)32 << 20)

struct up_job {
    const uint8_t *src;     /* host bytes */
    size_t bytes;
    uint8_t *dst;           /* raw types: device destination */
    const ds4_weight *w;    /* planar types: the weight and its first block */
    int64_t b0, nblk;
    uint8_t *host_dst;      /* spilled (host-resident) raw weights: memcpy only */
};

struct up_state {
    cu_ctx *c;
    pthread_mutex_t mu;
    up_job *jobs;
    int n_jobs, next;
    int64_t done, total;
    int err;
    char msg[256];
    int (*progress)(void *, int64_t, int64_t);
    void *progress_user;
    bool cancel;
};

static void *up_worker(void *arg) {
    up_state *u = (up_state *)arg;
    cudaSetDevice(u->c->device);
    cudaStream_t st;
    void *pin[2] = {nullptr, nullptr};
    uint8_t *dtmp = nullptr;
    cudaEvent_t ev[2];
    bool ok = cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking) == cudaSuccess &&
              cudaHostAlloc(&pin[0], UP_CHUNK, cudaHostAllocDefault) == cudaSuccess &&
              cudaHostAlloc(&pin[1], UP_CHUNK, cudaHostAllocDefault) == cudaSuccess &&
              cudaMalloc((void **)&dtmp, UP_CHUNK) == cudaSuccess && cudaEventCreate(&ev[0]) == cudaSuccess &&
              cudaEventCreate(&ev[1]) == cudaSuccess;
    int k = 0;
    for (bool first[2] = {true, true}; ok;) {
        pthread_mutex_lock(&u->mu);
        int j = u->err || u->cancel ? u->n_jobs : u->next++;
        pthread_mutex_unlock(&u->mu);
        if (j >= u->n_jobs) break;
        up_job *jb = &u->jobs[j];
        if (jb->host_dst) {
            memcpy(jb->host_dst, jb->src, jb->bytes);
        } else {
            if (!first[k]) ok = cudaEventSynchronize(ev[k]) == cudaSuccess;
            first[k] = false;
            memcpy(pin[k], jb->src, jb->bytes);
            if (jb->w) {
                const ds4_weight *w = jb->w;
                int blk = ds4_type_get(w->type)->block_bytes, pay = (int)cu_payload_block(w->type);
                uint8_t *q = (uint8_t *)w->data, *s = q + cu_scale_offset(w);
                ok = ok && cudaMemcpyAsync(dtmp, pin[k], jb->bytes, cudaMemcpyHostToDevice, st) == cudaSuccess;
                if (ok) {
                    k_repack<<<cu_div_up(jb->nblk, 256), 256, 0, st>>>(dtmp, jb->nblk, blk, pay, q, s, jb->b0);
                    ok = cudaGetLastError() == cudaSuccess;
                }
            } else {
                ok = ok && cudaMemcpyAsync(jb->dst, pin[k], jb->bytes, cudaMemcpyHostToDevice, st) == cudaSuccess;
            }
            ok = ok && cudaEventRecord(ev[k], st) == cudaSuccess;
            k ^= 1;
        }
        pthread_mutex_lock(&u->mu);
        u->done += (int64_t)jb->bytes;
        if (u->progress && u->progress(u->progress_user, u->done, u->total)) u->cancel = true;
        pthread_mutex_unlock(&u->mu);
    }
    if (ok) ok = cudaStreamSynchronize(st) == cudaSuccess;
    if (!ok) {
        cudaError_t e = cudaGetLastError();
        pthread_mutex_lock(&u->mu);
        if (!u->err) {
            u->err = e == cudaErrorMemoryAllocation ? DS4_E_NOMEM : DS4_E_BACKEND;
            snprintf(u->msg, sizeof u->msg, "uploading weights: %s", cudaGetErrorString(e));
        }
        pthread_mutex_unlock(&u->mu);
    }
    cudaFreeHost(pin[0]);
    cudaFreeHost(pin[1]);
    cudaFree(dtmp);
    cudaStreamDestroy(st);
    return nullptr;
}

struct bind_state {
    cu_ctx *c;
    const ds4_bind_opts *o;
    up_state *u;
    int cap_jobs;
    size_t spill_keep;     /* device bytes to keep free when deciding to spill */
    char msg[256];
    int err;
};

static bool add_job(bind_state *b, const up_job &j) {
    up_state *u = b->u;
    if (u->n_jobs == b->cap_jobs) {
        int nc = b->cap_jobs ? 2 * b->cap_jobs : 4096;
        up_job *nj = (up_job *)realloc(u->jobs, (size_t)nc * sizeof(up_job));
        if (!nj) return false;
        u->jobs = nj;
        b->cap_jobs = nc;
    }
    u->jobs[u->n_jobs++] = j;
    u->total += (int64_t)j.bytes;
    return true;
}

static bool remember(cu_ctx *c, const ds4_weight *w, const void *src, void *dev) {
    if (c->n_bound == c->cap_bound) {
        int nc = c->cap_bound ? 2 * c->cap_bound : 2048;
        cu_ctx::cu_bound *nb = (cu_ctx::cu_bound *)realloc(c->bound, (size_t)nc * sizeof *nb);
        if (!nb) return false;
        c->bound = nb;
        c->cap_bound = nc;
    }
    c->bound[c->n_bound++] = cu_ctx::cu_bound{w->name, src, w->type, w->n_in, w->n_out, w->n_mat, dev};
    return true;
}

static int bind_weight(void *user, ds4_weight *w) {
    bind_state *b = (bind_state *)user;
    cu_ctx *c = b->c;
    size_t bytes = cu_weight_bytes(w);
    const uint8_t *src = (const uint8_t *)w->data;
    for (int i = 0; i < c->n_bound; i++) { /* a view of a tensor bound before (MTP: tok_embd, output) */
        const cu_ctx::cu_bound &k = c->bound[i];
        if (k.name && k.name == w->name && k.src == (const void *)src && k.type == w->type && k.n_in == w->n_in &&
            k.n_out == w->n_out && k.n_mat == w->n_mat) {
            w->data = k.dev;
            return 0;
        }
    }
    bool expert = w->n_mat > 1;
    void *p = nullptr;
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    if (!(expert && free_b < bytes + b->spill_keep) && cudaMalloc(&p, bytes) != cudaSuccess) {
        cudaGetLastError();
        p = nullptr;
    }
    if (!p) {
        /* Routed experts that do not fit stay in pinned host memory, read
         * by the kernels over the bus (raw layouts only). */
        if (!expert || cu_planar(w->type) || !src) {
            b->err = DS4_E_NOMEM;
            snprintf(b->msg, sizeof b->msg, "cuda: out of device memory for tensor '%s' (%.2f GiB; %.2f GiB free)",
                     w->name ? w->name : "?", (double)bytes / (1 << 30), (double)free_b / (1 << 30));
            return DS4_E_NOMEM;
        }
        void *hp = nullptr;
        if (cudaHostAlloc(&hp, bytes, cudaHostAllocMapped) != cudaSuccess ||
            cudaHostGetDevicePointer(&p, hp, 0) != cudaSuccess) {
            cudaGetLastError();
            b->err = DS4_E_NOMEM;
            snprintf(b->msg, sizeof b->msg, "cuda: cannot pin %.2f GiB of host memory for tensor '%s'",
                     (double)bytes / (1 << 30), w->name ? w->name : "?");
            if (hp) cudaFreeHost(hp);
            return DS4_E_NOMEM;
        }
        if (!track(&c->pinned, &c->n_pinned, &c->cap_pinned, hp)) return DS4_E_NOMEM;
        c->bytes_host += bytes;
        if (!add_job(b, up_job{src, bytes, nullptr, nullptr, 0, 0, (uint8_t *)hp})) return DS4_E_NOMEM;
        if (!remember(c, w, src, p)) return DS4_E_NOMEM;
        w->data = p;
        return 0;
    }
    if (!track(&c->allocs, &c->n_allocs, &c->cap_allocs, p)) {
        cudaFree(p);
        return DS4_E_NOMEM;
    }
    c->bytes_device += bytes;
    if (!remember(c, w, src, p)) return DS4_E_NOMEM;
    w->data = p;
    if (!src) { /* synthetic */
        int type = w->type;
        int blk = ds4_synth_block_bytes(type), ne = ds4_synth_block_elems(type);
        int64_t nblk = (int64_t)w->n_in / ne * w->n_out * w->n_mat;
        bool planar = cu_planar(type);
        uint8_t *q = (uint8_t *)p, *s = planar ? q + cu_scale_offset(w) : nullptr;
        k_synth<<<cu_div_up(nblk, 256), 256, 0, c->st>>>(type, ds4_synth_key(b->o->seed, w->name),
                                                          ds4_model_synth_std(w), nblk, blk, q, s, planar,
                                                          (int)cu_payload_block(type));
        if (!cu_launched(c, "synthetic fill")) return c->err;
        b->u->total += (int64_t)bytes;
        b->u->done += (int64_t)bytes;
        return 0;
    }
    if (cu_planar(w->type)) {
        int blk = ds4_type_get(w->type)->block_bytes;
        int64_t nblk = (int64_t)(w->mat_bytes * (size_t)w->n_mat / (size_t)blk);
        int64_t per = (int64_t)(UP_CHUNK / (size_t)blk);
        for (int64_t b0 = 0; b0 < nblk; b0 += per) {
            int64_t nb = nblk - b0 < per ? nblk - b0 : per;
            if (!add_job(b, up_job{src + b0 * blk, (size_t)(nb * blk), nullptr, w, b0, nb, nullptr})) return DS4_E_NOMEM;
        }
    } else {
        for (size_t o = 0; o < bytes; o += UP_CHUNK) {
            size_t nb = bytes - o < UP_CHUNK ? bytes - o : UP_CHUNK;
            if (!add_job(b, up_job{src + o, nb, (uint8_t *)p + o, nullptr, 0, 0, nullptr})) return DS4_E_NOMEM;
        }
    }
    return 0;
}

static int bind_vec(void *user, void **pp, size_t bytes) {
    bind_state *b = (bind_state *)user;
    cu_ctx *c = b->c;
    void *p = nullptr;
    if (!cu_ok(c, cudaMalloc(&p, bytes), "allocating a model vector")) return c->err;
    if (!track(&c->allocs, &c->n_allocs, &c->cap_allocs, p)) return DS4_E_NOMEM;
    if (!cu_ok(c, cudaMemcpy(p, *pp, bytes, cudaMemcpyHostToDevice), "uploading a model vector")) return c->err;
    c->bytes_device += bytes;
    *pp = p;
    return 0;
}

static void free_binding(cu_ctx *c) {
    cudaDeviceSynchronize();
    for (int i = 0; i < c->n_allocs; i++) cudaFree(c->allocs[i]);
    for (int i = 0; i < c->n_pinned; i++) cudaFreeHost(c->pinned[i]);
    free(c->allocs);
    free(c->pinned);
    c->allocs = nullptr;
    c->pinned = nullptr;
    c->n_allocs = c->cap_allocs = c->n_pinned = c->cap_pinned = 0;
    free(c->bound);
    c->bound = nullptr;
    c->n_bound = c->cap_bound = 0;
    c->bytes_device = c->bytes_host = 0;
}

static int cu_bind_model(void *ctx, const ds4_model *host, const ds4_bind_opts *o, ds4_model **bound, ds4_err *err) {
    cu_ctx *c = (cu_ctx *)ctx;
    ds4_model *mm = ds4_model_mirror(host);
    if (!mm) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    up_state u;
    memset(&u, 0, sizeof u);
    u.c = c;
    pthread_mutex_init(&u.mu, nullptr);
    u.progress = o->progress;
    u.progress_user = o->progress_user;
    bind_state b;
    memset(&b, 0, sizeof b);
    b.c = c;
    b.o = o;
    b.u = &u;
    b.spill_keep = (size_t)8 << 30;
    ds4_model_visit v = {bind_weight, bind_vec, &b};
    int rc = ds4_model_visit_all(mm, &v);
    if (!rc && u.n_jobs) {
        pthread_t th[UP_WORKERS];
        int nw = 0;
        for (int i = 0; i < UP_WORKERS; i++)
            if (pthread_create(&th[i], nullptr, up_worker, &u) == 0) nw++;
        for (int i = 0; i < nw; i++) pthread_join(th[i], nullptr);
        if (!nw) rc = ds4_err_set(err, DS4_E_INTERNAL, "cuda: cannot start upload threads");
        else if (u.err) rc = ds4_err_set(err, u.err, "cuda: %s", u.msg);
        else if (u.cancel) rc = ds4_err_set(err, DS4_E_CANCEL, "cancelled");
    } else if (!rc && o->progress) {
        o->progress(o->progress_user, u.total, u.total);
    }
    if (!rc && !cu_ok(c, cudaStreamSynchronize(c->st), "binding the model")) rc = report(c, err);
    if (rc && !err->code) {
        if (b.err) rc = ds4_err_set(err, b.err, "%s", b.msg);
        else if (c->err) rc = report(c, err);
        else rc = ds4_err_set(err, rc, "cuda: binding the model failed");
    }
    free(u.jobs);
    pthread_mutex_destroy(&u.mu);
    if (rc) {
        free_binding(c);
        ds4_model_mirror_free(mm);
        return rc;
    }
    *bound = mm;
    return 0;
}

static void cu_unbind_model(void *ctx, ds4_model *bound) {
    cu_ctx *c = (cu_ctx *)ctx;
    free_binding(c);
    ds4_model_mirror_free(bound);
}

/* ---------------------------------------------------------------- checks */

static int cu_check_model(void *ctx, const ds4_model *m, ds4_err *err) {
    (void)ctx;
    const ds4_hparams *hp = &m->hp;
    if (hp->n_hc > 8) return ds4_err_set(err, DS4_E_MODEL, "cuda backend: hyper_connection.count %d exceeds 8", hp->n_hc);
    if (hp->head_dim % 32 || hp->head_dim > 512)
        return ds4_err_set(err, DS4_E_MODEL, "cuda backend: key_length %d must be a multiple of 32 up to 512", hp->head_dim);
    if (hp->n_embd % 32 || hp->q_lora % 32 || hp->o_lora % 32 || hp->n_ff_exp % 32 || hp->idx_dim > 1024)
        return ds4_err_set(err, DS4_E_MODEL, "cuda backend: dimensions must be multiples of 32");
    if (hp->n_expert > 256 || hp->n_expert_used > 16)
        return ds4_err_set(err, DS4_E_MODEL, "cuda backend: at most 256 experts and 16 per token");
    if (hp->idx_heads > 64 || hp->idx_dim % 32)
        return ds4_err_set(err, DS4_E_MODEL, "cuda backend: at most 64 indexer heads of a multiple of 32 dims");
    if (hp->n_rot > 128) return ds4_err_set(err, DS4_E_MODEL, "cuda backend: rope.dimension_count > 128");
    if (hp->idx_dim > 256 || hp->n_hc > 4)
        return ds4_err_set(err, DS4_E_MODEL, "cuda backend: indexer key_length > 256 or more than 4 HC streams");
    const ds4_weight *plain[] = {&m->out_hc_fn};
    for (size_t i = 0; i < 1; i++)
        if (plain[i]->type != DS4_TYPE_F32 && plain[i]->type != DS4_TYPE_F16 && plain[i]->type != DS4_TYPE_BF16)
            return ds4_err_set(err, DS4_E_MODEL, "cuda backend: tensor '%s' must be F32, F16 or BF16", plain[i]->name);
    if ((hp->n_head / hp->o_groups) * hp->head_dim % 32)
        return ds4_err_set(err, DS4_E_MODEL, "cuda backend: output groups must cover multiples of 32 values");
    for (int il = 0; il < hp->n_layer; il++) {
        const ds4_layer *l = &m->layers[il];
        if ((l->kind == DS4_ATTN_CSA ? 2 : 1) * l->ratio > 1024)
            return ds4_err_set(err, DS4_E_MODEL, "cuda backend: layer %d compress ratio %d is too large", il, l->ratio);
        const ds4_weight *ws[] = {&l->q_a, &l->q_b, &l->kv, &l->o_a, &l->o_b, &l->gate_inp, &l->gate_exps,
                                  &l->up_exps, &l->down_exps, &l->gate_sh, &l->up_sh, &l->down_sh, &l->hc_attn_fn,
                                  &l->comp_kv, &l->comp_gate, &l->idx_q_b, &l->idx_proj, &l->icomp_kv, &l->icomp_gate};
        const ds4_weight *pl[] = {&l->hc_attn_fn, &l->hc_ffn_fn, &l->comp_ape, &l->icomp_ape};
        for (size_t i = 0; i < sizeof pl / sizeof pl[0]; i++)
            if (pl[i]->n_in > 0 && pl[i]->type != DS4_TYPE_F32 && pl[i]->type != DS4_TYPE_F16 && pl[i]->type != DS4_TYPE_BF16)
                return ds4_err_set(err, DS4_E_MODEL, "cuda backend: tensor '%s' must be F32, F16 or BF16", pl[i]->name);
        for (size_t i = 0; i < sizeof ws / sizeof ws[0]; i++)
            if (ws[i]->n_in > 0 && ws[i]->n_in % 32)
                return ds4_err_set(err, DS4_E_MODEL, "cuda backend: tensor '%s' rows of %lld values (need multiples of 32)",
                                   ws[i]->name, (long long)ws[i]->n_in);
    }
    return 0;
}

static int cu_kv_row_type(void *ctx, ds4_numerics num) {
    (void)ctx;
    return num.f16_cache ? DS4_TYPE_F16 : DS4_TYPE_F32;
}

/* ---------------------------------------------------------------- scratch */

static void drop_graphs(cu_ctx *c) {
    for (int i = 0; i < CU_MAX_GRAPHS; i++)
        if (c->graphs[i].key) {
            cudaGraphExecDestroy(c->graphs[i].exec);
            c->graphs[i].key = 0;
        }
}

/* Carves the scratch buffers for batch B and context C out of one
 * allocation (sizes: cuda.cuh cu_scratch). */
static size_t layout_scratch(cu_ctx *c, const ds4_model *m, size_t B, size_t C, char *base, cu_scratch *s) {
    const ds4_hparams *hp = &m->hp;
    const size_t D = hp->n_embd, H = hp->n_head, dh = hp->head_dim, G = hp->o_groups, K = hp->n_expert_used;
    const size_t F = hp->n_ff_exp, E = hp->n_expert, IH = hp->idx_heads, ID = hp->idx_dim;
    size_t off = 0;
    auto take = [&](size_t bytes) -> char * {
        char *p = base ? base + off : nullptr;
        off += align256(bytes ? bytes : 1);
        return p;
    };
    size_t row_max = D;
    size_t dims[] = {(size_t)hp->q_lora, H * dh, G * hp->o_lora, F, (size_t)hp->n_hc * D};
    for (size_t d : dims) row_max = d > row_max ? d : row_max;
    auto act = [&](cu_act *a, size_t vals) {
        a->cap = vals;
        a->q = (int8_t *)take(vals);
        a->d = (float *)take(vals / 32 * sizeof(float) + 64);
        a->bs = (int32_t *)take(vals / 16 * sizeof(int32_t) + 64);
    };
    act(&s->a1, B * row_max);
    act(&s->a2, B * D);
    act(&s->a3, B * K * (F > D ? F : D));
    act(&s->h0, B * D);
    act(&s->hk, B * D);
    act(&s->a4, 4 * F); /* MOE1_MAX_N tokens */
    act(&s->ac, B * D);
    s->o = (float *)take(B * H * dh * 4);
    { /* split attention partials: splits for the longest row list of any
       * layer, tokens per launch within ~256 MiB */
        int nr = hp->window;
        for (int il = 0; il < hp->n_layer; il++) {
            const ds4_layer *l = &m->layers[il];
            int v = hp->window + (l->kind == DS4_ATTN_CSA ? hp->idx_topk
                                  : l->kind == DS4_ATTN_HCA ? (int)(C / (size_t)l->ratio) + 1 : 0);
            nr = v > nr ? v : nr;
        }
        s->att_splits = cu_attn_splits(nr);
        size_t per_tok = (size_t)s->att_splits * H * dh * 4;
        size_t nt = ((size_t)256 << 20) / per_tok;
        s->att_tokens = (int)(nt < 1 ? 1 : nt > B ? B : nt);
        s->att_o = (float *)take((size_t)s->att_tokens * per_tok);
        s->att_m = (float *)take((size_t)s->att_tokens * s->att_splits * H * 4);
        s->att_l = (float *)take((size_t)s->att_tokens * s->att_splits * H * 4);
    }
    s->z = (float *)take(B * G * hp->o_lora * 4);
    s->ca = (float *)take(B * 2 * dh * 4);
    s->cg = (float *)take(B * 2 * dh * 4);
    s->qi = (float *)take(B * IH * ID * 4);
    s->wt = (float *)take(B * IH * 4);
    s->qc = (int8_t *)take(B * IH * ID);
    s->qp = (float *)take(B * IH * (ID / 32 + 1) * 4);
    s->topw = (unsigned *)take(4 * 1024 * sizeof(unsigned));
    s->score_rows = (int)(B < 64 ? B : 64);
    s->scores = (float *)take((size_t)s->score_rows * (C / 4 + 1) * 4);
    s->hcp = (float *)take(B * c->hc_split * 32 * 4);
    s->hcs = (double *)take(B * c->hc_split * 8);
    s->hcc = (unsigned *)take(B * sizeof(unsigned));
    s->xn_cap = (B < 8 ? B : 8) * (size_t)hp->n_hc * D; /* k_hc takes fewer than HCB_MIN_N = 8 tokens */
    s->xn = (float *)take(s->xn_cap * 4);
    s->rcc = (unsigned *)take(sizeof(unsigned));
    s->mcc = (unsigned *)take((4 * K + 1) * (F / 256 + 1) * sizeof(unsigned));
    s->mix = (float *)take(B * 32 * 4);
    s->cin = (float *)take((B < 8 ? B : 8) * 32 * 4); /* a comb HC-pre left for later (cu_comb_job) */
    s->hn = (float *)take(B * D * 4);
    s->rl = (float *)take(B * E * 4);
    s->items = (int32_t *)take(B * K * 4);
    s->off = (int32_t *)take((E + 1) * 4);
    s->act = (int32_t *)take((E + 1) * 4);
    s->gu = (float *)take(B * K * F * 4);
    /* expert outputs; also the MTP block's normed streams (n_hc rows per token) */
    s->out = (float *)take(B * (K > (size_t)hp->n_hc ? K : (size_t)hp->n_hc) * D * 4);
    s->sg = (float *)take(B * F * 4);
    s->su = (float *)take(B * F * 4);
    s->sd = (float *)take(B * D * 4);
    s->tmp = (float *)take(B * (D > (size_t)hp->q_lora ? D : hp->q_lora) * 4);
    if (c->blas && B >= (size_t)cu_blas_min(c)) { /* DS4_CUDA_BLAS=1 (mm_blas.cu) */
        s->xh_cap = B * row_max;
        s->xh = (__half *)take(s->xh_cap * 2);
        s->wh = (__half *)take(CU_BLAS_WH * 2);
    }
    s->n_batch = B;
    s->n_ctx = C;
    return off;
}

static int cu_reserve(void *ctx, const ds4_model *m, int n_batch, int n_ctx, ds4_err *err) {
    cu_ctx *c = (cu_ctx *)ctx;
    size_t B = (size_t)n_batch, C = (size_t)n_ctx;
    if (c->scratch_mem && B <= c->s.n_batch && C <= c->s.n_ctx) return 0;
    if (c->scratch_mem) { /* grow to cover both the old and the new request */
        B = B > c->s.n_batch ? B : c->s.n_batch;
        C = C > c->s.n_ctx ? C : c->s.n_ctx;
    }
    cu_scratch s;
    memset(&s, 0, sizeof s);
    size_t bytes = layout_scratch(c, m, B, C, nullptr, &s);
    void *p = nullptr;
    cu_join(c);
    cudaStreamSynchronize(c->st);
    if (cudaMalloc(&p, bytes) != cudaSuccess) {
        cudaGetLastError();
        return ds4_err_set(err, DS4_E_NOMEM, "cuda: out of device memory for %.2f GiB of scratch (batch %zu, context %zu)",
                           (double)bytes / (1 << 30), B, C);
    }
    drop_graphs(c);
    if (c->scratch_mem) cudaFree(c->scratch_mem);
    c->scratch_mem = p;
    c->scratch_bytes = bytes;
    layout_scratch(c, m, B, C, (char *)p, &c->s);
    const size_t nmcc = (size_t)(4 * m->hp.n_expert_used + 1) * (m->hp.n_ff_exp / 256 + 1);
    if (cudaMemset(c->s.hcc, 0, B * sizeof(unsigned)) != cudaSuccess ||
        cudaMemset(c->s.mcc, 0, nmcc * sizeof(unsigned)) != cudaSuccess ||
        cudaMemset(c->s.rcc, 0, sizeof(unsigned)) != cudaSuccess ||
        cudaMemset(c->s.topw, 0, 4 * 1024 * sizeof(unsigned)) != cudaSuccess) {
        cudaGetLastError();
        return ds4_err_set(err, DS4_E_BACKEND, "cuda: scratch initialisation failed");
    }
    return 0;
}

/* ---------------------------------------------------------------- steps */

/* DS4_CUDA_GTRACE=N in a CU_GTRACE build (cuda.cuh): the N-th replay of a
 * step graph logs its kernels' first and last blocks; gt_end writes them. */
static void gt_begin(cu_ctx *c) {
    c->gt_on = false;
    if (!CU_GTRACE || !c->gtrace || !c->gt_ctr || ++c->gt_replays != c->gtrace) return;
    c->gt_on = cu_ok(c, cudaMemsetAsync(c->gt_ctr, 0, sizeof(unsigned), c->st), "gtrace");
}

static void gt_end(cu_ctx *c) {
#if CU_GTRACE
    if (!c->gt_on) return;
    c->gt_on = false;
    unsigned n = 0, off = CU_GT_CAP;
    if (cudaMemcpy(&n, c->gt_ctr, sizeof n, cudaMemcpyDeviceToHost) != cudaSuccess ||
        cudaMemcpy(c->gt_ctr, &off, sizeof off, cudaMemcpyHostToDevice) != cudaSuccess)
        return;
    if (n > CU_GT_CAP) n = CU_GT_CAP;
    cu_gt_rec *r = (cu_gt_rec *)malloc((size_t)n * sizeof *r + 1);
    if (!r || cudaMemcpy(r, c->gt_buf, (size_t)n * sizeof *r, cudaMemcpyDeviceToHost) != cudaSuccess) {
        free(r);
        return;
    }
    const char *path = "ds4-gtrace.txt";
    FILE *f = fopen(path, "w");
    if (f) {
        fprintf(f, "# file line last nblk smid t_pre t_post t_exit (ns, %%globaltimer)\n");
        for (unsigned i = 0; i < n; i++)
            fprintf(f, "%.16s %d %d %u %u %llu %llu %llu\n", r[i].file, r[i].line, r[i].last, r[i].nblk, r[i].smid,
                    r[i].t_pre, r[i].t_post, r[i].t_exit);
        fclose(f);
        fprintf(stderr, "ds4: cuda: %u timeline records of graph replay %ld written to %s\n", n, c->gt_replays, path);
    }
    free(r);
#else
    (void)c;
#endif
}

static int cu_step_begin(void *ctx, const ds4_step_info *si, ds4_err *err) {
    cu_preq_clear((cu_ctx *)ctx);
    cu_ctx *c = (cu_ctx *)ctx;
    c->moe_grouped = nullptr;
    c->kv_fused = cu_kv_fused{};
    c->err = 0;
    c->capturing = false;
    c->qa_live = false;
    if (c->no_graphs || !si->graph_key) return 0;
    for (int i = 0; i < CU_MAX_GRAPHS; i++)
        if (c->graphs[i].key == si->graph_key) {
            c->graphs[i].used = ++c->graph_clock;
            gt_begin(c);
            if (!cu_ok(c, cudaGraphLaunch(c->graphs[i].exec, c->st), "graph launch")) return report(c, err);
            return 1;
        }
    if (!cu_ok(c, cudaStreamBeginCapture(c->st, cudaStreamCaptureModeThreadLocal), "begin capture"))
        return report(c, err);
    c->capturing = true;
    c->cap_key = si->graph_key;
    return 0;
}

static void finish_capture(cu_ctx *c) {
    cudaGraph_t g = nullptr;
    cudaError_t e = cudaStreamEndCapture(c->st, &g);
    c->capturing = false;
    if (c->err) { /* a stage failed while capturing: run nothing */
        if (g) cudaGraphDestroy(g);
        return;
    }
    if (!cu_ok(c, e, "end capture")) return;
    cudaGraphExec_t exec;
    e = cudaGraphInstantiate(&exec, g, 0);
    cudaGraphDestroy(g);
    if (!cu_ok(c, e, "graph instantiate")) return;
    int slot = 0;
    for (int i = 0; i < CU_MAX_GRAPHS; i++) {
        if (!c->graphs[i].key) {
            slot = i;
            break;
        }
        if (c->graphs[i].used < c->graphs[slot].used) slot = i;
    }
    if (c->graphs[slot].key) cudaGraphExecDestroy(c->graphs[slot].exec);
    c->graphs[slot] = cu_graph{c->cap_key, exec, ++c->graph_clock};
    cu_ok(c, cudaGraphLaunch(exec, c->st), "graph launch");
}

/* Holds the stream for ns nanoseconds (per-kernel profile: the host
 * queues the step's launches meanwhile, so the marks time the GPU, not the
 * launch rate of an eager step). */
__global__ void k_spin(long long ns) {
    long long t0;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    for (;;) {
        long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        if (t - t0 >= ns) break;
        __nanosleep(1000);
    }
}

static void prof_mark(void *ctx, int kind) {
    cu_ctx *c = (cu_ctx *)ctx;
    if (c->capturing || c->err) return;
    if (c->kprof && c->n_prof == 0) k_spin<<<1, 1, 0, c->st>>>(50LL * 1000 * 1000);
    if (c->n_prof == c->cap_prof) {
        int nc = c->cap_prof ? 2 * c->cap_prof : 1024;
        cudaEvent_t *ne = (cudaEvent_t *)realloc(c->prof_ev, (size_t)nc * sizeof(cudaEvent_t));
        if (ne) c->prof_ev = ne;
        int *nk = (int *)realloc(c->prof_kind, (size_t)nc * sizeof(int));
        if (nk) c->prof_kind = nk;
        if (!ne || !nk) return;
        for (int i = c->cap_prof; i < nc; i++) cudaEventCreate(&c->prof_ev[i]);
        c->cap_prof = nc;
    }
    cudaEventRecord(c->prof_ev[c->n_prof], c->st);
    c->prof_kind[c->n_prof++] = kind;
}

/* After a synchronised step: milliseconds between consecutive marks go to
 * the stage of the last stage mark, and to the kernel whose launch closes
 * the interval (kernel marks follow each launch). */
static void prof_collect(cu_ctx *c) {
    int stage = -1;
    for (int i = 0; i + 1 < c->n_prof; i++) {
        if (c->prof_kind[i] <= DS4_PROF_N) stage = c->prof_kind[i];
        float ms = 0.0f;
        if (cudaEventElapsedTime(&ms, c->prof_ev[i], c->prof_ev[i + 1]) != cudaSuccess) continue;
        if (stage >= 0 && stage < DS4_PROF_N) c->prof_ms[stage] += ms;
        const int k = c->prof_kind[i + 1] - CU_KPROF_BASE;
        if (k >= 0 && k < c->n_kp) {
            c->kp[k].ms += ms;
            c->kp[k].calls++;
        }
    }
    cudaGetLastError();
    c->n_prof = 0;
}

/* The per-kernel table on stderr (DS4_CUDA_KPROF=1), largest first. */
static void kprof_print(cu_ctx *c) {
    double tot = 0.0;
    for (int i = 0; i < c->n_kp; i++) tot += c->kp[i].ms;
    if (tot <= 0.0) return;
    fprintf(stderr, "cuda kernel profile (eager profiled steps; ms include launch gaps):\n");
    bool done[96] = {false};
    for (int n = 0; n < c->n_kp; n++) {
        int b = -1;
        for (int i = 0; i < c->n_kp; i++)
            if (!done[i] && (b < 0 || c->kp[i].ms > c->kp[b].ms)) b = i;
        done[b] = true;
        fprintf(stderr, "  %-16s %8ld calls %10.3f ms %5.1f%% %8.2f us/call\n", c->kp[b].name, c->kp[b].calls,
                c->kp[b].ms, 100.0 * c->kp[b].ms / tot, c->kp[b].calls ? 1e3 * c->kp[b].ms / c->kp[b].calls : 0.0);
    }
}

static int prof_read(void *ctx, double *ms) {
    cu_ctx *c = (cu_ctx *)ctx;
    for (int i = 0; i < DS4_PROF_N; i++) {
        ms[i] = c->prof_ms[i];
        c->prof_ms[i] = 0.0;
    }
    return 0;
}

/* Streaming read of 4 GiB: grid-stride 16-byte loads, the sum written so
 * the loads are not removed. */
__global__ void k_read(const uint4 *p, size_t n, unsigned *out) {
    unsigned acc = 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint4 v = p[i];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x12345678u) *out = acc;
}

static int bandwidth(void *ctx, double *gbps, ds4_err *err) {
    cu_ctx *c = (cu_ctx *)ctx;
    const size_t bytes = (size_t)4 << 30;
    void *p = nullptr;
    unsigned *o = nullptr;
    cudaEvent_t a, b;
    if (cudaMalloc(&p, bytes) != cudaSuccess || cudaMalloc((void **)&o, 4) != cudaSuccess) {
        cudaGetLastError();
        if (p) cudaFree(p);
        return ds4_err_set(err, DS4_E_NOMEM, "cuda: no room for the bandwidth probe");
    }
    cudaMemsetAsync(p, 1, bytes, c->st);
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    float best = 1e30f;
    for (int r = 0; r < 6; r++) {
        cudaEventRecord(a, c->st);
        k_read<<<c->n_sm * 8, 512, 0, c->st>>>((const uint4 *)p, bytes / 16, o);
        cudaEventRecord(b, c->st);
        cudaEventSynchronize(b);
        float ms = 0;
        cudaEventElapsedTime(&ms, a, b);
        if (r > 0 && ms < best) best = ms;
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    cudaFree(p);
    cudaFree(o);
    if (!cu_ok(c, cudaGetLastError(), "bandwidth probe")) return report(c, err);
    *gbps = (double)bytes / (best * 1e-3) / 1e9;
    return 0;
}

static void describe(void *ctx, char *buf, size_t cap) {
    cu_ctx *c = (cu_ctx *)ctx;
    size_t fr = 0, tot = 0;
    cudaMemGetInfo(&fr, &tot);
    snprintf(buf, cap,
             "%s, %d SMs, %.1f GiB; weights %.2f GiB on the device, %.2f GiB in pinned host memory; scratch %.2f GiB; "
             "%.1f GiB free",
             c->dev_name, c->n_sm, (double)tot / (1 << 30), (double)c->bytes_device / (1 << 30),
             (double)c->bytes_host / (1 << 30), (double)c->scratch_bytes / (1 << 30), (double)fr / (1 << 30));
}

static int cu_step_end(void *ctx, ds4_err *err) {
    cu_ctx *c = (cu_ctx *)ctx;
    cu_join(c);
    cu_join_ahead(c);
    if (c->capturing) finish_capture(c);
    cu_ok(c, cudaMemcpyAsync(c->hstatus, c->dstatus, sizeof(int), cudaMemcpyDeviceToHost, c->st), "status");
    cu_ok(c, cudaStreamSynchronize(c->st), "step");
    gt_end(c);
    if (c->n_prof) prof_collect(c);
    if (*c->hstatus) {
        int st = *c->hstatus;
        /* cleared (and a failed top-k meeting's state reset) whatever else
         * failed, so that the next step starts clean */
        cudaMemsetAsync(c->dstatus, 0, sizeof(int), c->st);
        if (st & CU_ST_TOPK_SYNC) cudaMemsetAsync(c->s.topw, 0, 4 * 1024 * sizeof(unsigned), c->st);
        cudaStreamSynchronize(c->st);
        if (!c->err && (st & CU_ST_TOPK_SYNC))
            cu_fail(c, DS4_E_BACKEND, "cuda: the indexer top-k blocks did not meet within 2 s");
        else if (!c->err && (st & CU_ST_F16_RANGE))
            cu_fail(c, DS4_E_RANGE, "cuda: a value is beyond the FP16 range of DS4_CUDA_BLAS=1 (or not a number); unset it");
        else if (!c->err)
            cu_fail(c, DS4_E_RANGE, "cuda: %s", st & CU_ST_COMP_RANGE ? "compressed rows exceed the session capacity"
                                                                       : "indexer rows exceed the session capacity");
    }
    if (c->err) return report(c, err);
    return 0;
}

static void cu_forget(void *ctx, uint64_t key) {
    cu_ctx *c = (cu_ctx *)ctx;
    for (int i = 0; i < CU_MAX_GRAPHS; i++)
        if (c->graphs[i].key && DS4_GRAPH_SESSION(c->graphs[i].key) == key) {
            cudaStreamSynchronize(c->st);
            cudaGraphExecDestroy(c->graphs[i].exec);
            c->graphs[i].key = 0;
        }
}

static int cu_argmax(void *ctx, const float *logits, int n_rows, int n_vocab, int32_t *ids, ds4_err *err) {
    cu_ctx *c = (cu_ctx *)ctx;
    cu_join(c);
    c->err = 0;
    for (int r0 = 0; r0 < n_rows; r0 += 64) {
        int nr = n_rows - r0 < 64 ? n_rows - r0 : 64;
        cu_argmax_rows(c, logits + (size_t)r0 * n_vocab, nr, n_vocab, c->dids);
        cu_ok(c, cudaMemcpyAsync(c->hids, c->dids, (size_t)nr * 4, cudaMemcpyDeviceToHost, c->st), "argmax");
        cu_ok(c, cudaStreamSynchronize(c->st), "argmax");
        if (c->err) return report(c, err);
        memcpy(ids + r0, c->hids, (size_t)nr * 4);
    }
    return 0;
}

/* ---------------------------------------------------------------- vtable */

static void cu_destroy(void *ctx) {
    cu_ctx *c = (cu_ctx *)ctx;
    if (!c) return;
    cudaSetDevice(c->device);
    cudaStreamSynchronize(c->st);
    if (c->st3) cudaStreamSynchronize(c->st3);
    if (c->kprof) kprof_print(c);
    if (c->hc_diag & 256) cu_hc_clk_print(c);
    drop_graphs(c);
    free_binding(c);
    if (c->scratch_mem) cudaFree(c->scratch_mem);
    if (c->dstatus) cudaFree(c->dstatus);
    if (c->dids) cudaFree(c->dids);
    if (c->gt_ctr) cudaFree(c->gt_ctr);
    if (c->gt_buf) cudaFree(c->gt_buf);
    if (c->hstatus) cudaFreeHost(c->hstatus);
    if (c->hids) cudaFreeHost(c->hids);
    if (c->grid) cudaFree((void *)c->grid);
    if (c->ksigns) cudaFree((void *)c->ksigns);
    for (int i = 0; i < c->cap_prof; i++) cudaEventDestroy(c->prof_ev[i]);
    free(c->prof_ev);
    free(c->prof_kind);
    cu_blas_close(c);
    if (c->st) cudaStreamDestroy(c->st);
    if (c->st2) cudaStreamDestroy(c->st2);
    if (c->ev_fork) cudaEventDestroy(c->ev_fork);
    if (c->ev_join) cudaEventDestroy(c->ev_join);
    if (c->st4) cudaStreamDestroy(c->st4);
    if (c->ev_qa) cudaEventDestroy(c->ev_qa);
    if (c->ev_iq) cudaEventDestroy(c->ev_iq);
    if (c->st3) cudaStreamDestroy(c->st3);
    if (c->ev_af) cudaEventDestroy(c->ev_af);
    if (c->ev_aj) cudaEventDestroy(c->ev_aj);
    if (c->comm_owner) nccl_comm_destroy(c->comm);
    free(c);
}

/* Debug and A/B switches, read from the environment once per backend (none
 * is needed in normal use; documented in docs/ARCHITECTURE.md section 7).
 * Each sets one int of cu_ctx to its decimal value; unset, empty or not a
 * number: the entry's `unset` value (0 unless given). */
typedef int cu_ctx::*cu_int_field;
static const struct cu_switch {
    const char *name;
    cu_int_field field;
    int unset;
} cu_switches[] = {
    {"DS4_CUDA_KPROF", &cu_ctx::kprof},                 /* 1: per-kernel times in ds4-bench --profile */
    {"DS4_CUDA_NO_PDL", &cu_ctx::no_pdl},               /* 1: no programmatic dependent launch */
    {"DS4_CUDA_NO_PREQ", &cu_ctx::no_preq},             /* 1: quantize activations at every consumer */
    {"DS4_CUDA_NO_ROUTE_GROUP", &cu_ctx::no_route_group}, /* 1: one-token expert grouping by moe_group */
    {"DS4_CUDA_MV_R1", &cu_ctx::mv_no_r2},              /* 1: one row per warp in every matvec */
    {"DS4_CUDA_MV_TALL", &cu_ctx::mv_tall, 2},          /* 0|4: many-row one-token Q8_0 launches at 1 or 4 rows per warp, not 2 (same bits) */
    {"DS4_CUDA_MV_TALL_MIN", &cu_ctx::mv_tall_min},     /* N: MV_TALL from N rows per launch (default 8192) */
    {"DS4_CUDA_NO_MV_FEW", &cu_ctx::mv_no_few},         /* 1: 2..4-token matvecs on the generic kernel */
    {"DS4_CUDA_MOE1_SEQ", &cu_ctx::moe1_seq},           /* 1: fused experts' rows one after the other */
    {"DS4_CUDA_XPF", &cu_ctx::xpf},                     /* 1: L2 prefetch of the fused experts' routed rows */
    {"DS4_CUDA_NO_MMA", &cu_ctx::no_mma},               /* 1: batches on the CUDA-core kernels only */
    {"DS4_CUDA_BLAS", &cu_ctx::blas},                   /* 1: batch Q8_0 projections as cuBLAS FP16 GEMMs (other bits) */
    {"DS4_CUDA_BLAS_MIN", &cu_ctx::blas_min},           /* N: DS4_CUDA_BLAS from N tokens per launch (default 128) */
    {"DS4_CUDA_MM_TW", &cu_ctx::mm_tw, 4},              /* 2: Q8_0 batch GEMM in 8 warps of 16 x 32, 228 registers (same bits) */
    {"DS4_CUDA_MM_LDM", &cu_ctx::mm_ldm, 1},            /* 0: k_mm_q8/k_moe_mm fragments by 32-bit shared loads (same bits) */
    {"DS4_CUDA_MF_TW", &cu_ctx::mf_tw, 2},              /* 1: F16/BF16 batch GEMM in 8 warps of 32 x 16 (same bits) */
    {"DS4_CUDA_ATT_HB", &cu_ctx::att_hb},               /* 1|2|4|8|16: CUDA-core attention heads per block (else 4) */
    {"DS4_CUDA_ATT_TC", &cu_ctx::att_tc},               /* 1: attention on TF32 tensor cores (k_attn_tc) */
    {"DS4_CUDA_NO_IDX_TILE", &cu_ctx::no_idx_tile},     /* 1: indexer scores on k_idx_scores (same bits) */
    {"DS4_CUDA_NO_IDX_MMA", &cu_ctx::no_idx_mma},       /* 1: FP4 indexer scores on CUDA cores (float sums) */
    {"DS4_CUDA_NO_TOPK_WIDE", &cu_ctx::no_topk_wide},   /* 1: the indexer top-k in one block per token */
    {"DS4_CUDA_ATT_HB_HCA", &cu_ctx::att_hb_hca, -1},   /* 1|2|4|8|16: heads per block, few-token HCA layers (0: as others) */
    {"DS4_CUDA_ATT_ZB", &cu_ctx::att_zb},               /* N: attention splits per block in batches (same bits) */
    {"DS4_CUDA_KV_IN_MERGE", &cu_ctx::kv_in_merge, 1},  /* 0: kv rows stored by kv_store, not the attention merge */
    {"DS4_CUDA_ATT_DH_RT", &cu_ctx::att_dh_rt},         /* 1: k_attn_part's head size at run time (same bits) */
    {"DS4_CUDA_ATT_RH", &cu_ctx::att_rh, 1},            /* 0: k_attn_part stages f16 rows as f32 (same bits), 16 heads per block in batches */
    {"DS4_CUDA_NO_MERGE_SLICES", &cu_ctx::no_merge_slices}, /* 1: attention merge in one block per head (same bits) */
    {"DS4_CUDA_ATT_ONLINE", &cu_ctx::att_online, 1},    /* 0: two-pass split merge, batches by k_attn_part + k_attn_merge (other bits) */
    {"DS4_CUDA_NO_ATT_FUSED", &cu_ctx::no_att_fused},   /* 1: batches by k_attn_part + the online merge (same bits) */
    {"DS4_CUDA_ATT_FUSED_MAX_S", &cu_ctx::att_fused_max_s, ATT_FUSED_MAX_S}, /* N: k_attn_fused up to N splits (same bits) */
    {"DS4_CUDA_TOPK_ILP", &cu_ctx::topk_ilp, -1},       /* 0|1|2: indexer top-k, 8 keys per thread never|always|by rows on device */
    {"DS4_CUDA_NO_ATT_R4", &cu_ctx::no_att_r4},         /* 1: k_attn_part's row-at-a-time loops (same bits) */
    {"DS4_CUDA_ATT_BFLY", &cu_ctx::att_bfly, 1},        /* 0: attention score sums one xor tree per score (same bits) */
    {"DS4_CUDA_ATT_TC_HB", &cu_ctx::att_tc_hb},         /* 16|32|64: tensor-core attention heads per block */
    {"DS4_CUDA_HC_DIAG", &cu_ctx::hc_diag},             /* timing only, wrong results: HC-pre bits */
    {"DS4_CUDA_TWICE", &cu_ctx::twice_diag},            /* 1: timing only, wrong results: eager launches twice (KPROF) */
    {"DS4_CUDA_FLOOR", &cu_ctx::floor_diag},            /* 1: timing only, wrong results: every step kernel empty */
    {"DS4_CUDA_NO_HC_BATCH", &cu_ctx::no_hc_batch},     /* 1: batches on the per-token HC kernel */
    {"DS4_CUDA_NO_MOE_FUSE", &cu_ctx::no_moe_fuse},     /* 1: one-token experts in 7 launches, not 2 */
    {"DS4_CUDA_NO_PREFETCH", &cu_ctx::no_prefetch},     /* 1: with EARLY_ or TAIL_TRIGGER, no L2 prefetch of weights */
    {"DS4_CUDA_TAIL_TRIGGER", &cu_ctx::tail_trig},      /* 1: HC-pre's finish and the router launch the next kernel early */
    {"DS4_CUDA_EARLY_TRIGGER", &cu_ctx::early_trigger}, /* 1: kernels let the next one launch at their start */
    {"DS4_CUDA_RING_IN_EMIT", &cu_ctx::ring_in_emit, 1}, /* 0: one token's frontier by k_comp_ring (one launch more) */
    {"DS4_CUDA_EMIT_REG", &cu_ctx::emit_reg, 1},        /* 0: compressor emit: candidates one load per loop step, block-tree maxima */
    {"DS4_CUDA_IDX_PP", &cu_ctx::idx_pp, 2},            /* 1: indexer scores (FP4, mma): one row block's loads, then its codes */
    {"DS4_CUDA_MERGE_REG", &cu_ctx::merge_reg, 1},      /* 0: the attention merge's loads one per loop step (same bits) */
    {"DS4_CUDA_ROWNORM_REG", &cu_ctx::rownorm_reg, 1},  /* 0: row norms through shared memory, loop loads (same bits) */
    {"DS4_CUDA_ARGMAX_VEC", &cu_ctx::argmax_vec, 1},    /* 0: argmax with one float load per step (same ids) */
    {"DS4_CUDA_ROUTE_REG", &cu_ctx::route_reg, 1},      /* 0: the router's ids read back from global memory */
    {"DS4_CUDA_ROUTE_LANES", &cu_ctx::route_lanes, 1}, /* 0: route_token's loads in its scoring loop, one token's top-k tail on lane 0 (same values) */
    {"DS4_CUDA_HC_WPRE", &cu_ctx::hc_wpre, 1},          /* 0: no L2 prefetch of k_hc's mixer slices before its PDL wait (same bits) */
    {"DS4_CUDA_HC_BFLY", &cu_ctx::hc_bfly, 1},          /* 0: k_hc's warp sums one xor tree per value */
    {"DS4_CUDA_HC_FIN2", &cu_ctx::hc_fin2, 1},          /* 0: HC-pre's finish: loop loads, Q8_0 maxima per block */
    {"DS4_CUDA_HC_FIN3", &cu_ctx::hc_fin3, 1},          /* 0: HC-pre's finish: norm loop unrolled (FIN2), weights in registers */
    {"DS4_CUDA_NO_HC_FUSE", &cu_ctx::no_hc_fuse},       /* 1: HC-post in its own kernel before HC-pre */
    {"DS4_CUDA_ROUTE_FUSE", &cu_ctx::route_fuse},       /* 1: one token's router in one launch (opt-in) */
    {"DS4_CUDA_NO_SIDE_STREAM", &cu_ctx::no_side_stream}, /* 1: the compressors on the main stream */
    {"DS4_CUDA_COMB_BIG", &cu_ctx::comb_big, 1},        /* 0: that comb not in the q_b matvec / fused experts' gate/up (same bits) */
    {"DS4_CUDA_COMB_HOST", &cu_ctx::comb_host, 1},      /* 0: HC-pre's Sinkhorn inside HC-pre (not a later kernel's spare block) */
    {"DS4_CUDA_L2AHEAD", &cu_ctx::l2ahead},             /* bits: weights prefetched to L2 ahead (cu_ahead) */
    {"DS4_CUDA_IDX_FORK", &cu_ctx::idx_fork, 1},        /* 0: the indexer's query path on the main stream (same bits) */
    {"DS4_CUDA_GTRACE", &cu_ctx::gtrace},               /* N: timeline of the N-th step graph replay (CU_GTRACE builds) */
};

static void cu_read_switches(cu_ctx *c) {
    for (size_t i = 0; i < sizeof cu_switches / sizeof cu_switches[0]; i++) {
        const char *v = getenv(cu_switches[i].name);
        char *end = nullptr;
        const long x = v && *v ? strtol(v, &end, 10) : 0;
        c->*cu_switches[i].field = v && *v && !*end && x >= INT_MIN && x <= INT_MAX ? (int)x : cu_switches[i].unset;
    }
    /* unset: 16 heads per block in few-token HCA attention over many rows
     * (att_hb_hca_min: the rows' capacity from which it applies; an
     * explicit value applies always); the 8-key top-k chosen by the
     * launch's rows (-1; 0, 1, 2 are the other modes) */
    c->att_hb_hca_min = c->att_hb_hca == -1 ? ATT_HB_HCA_MIN_ROWS : 0;
    if (c->att_hb_hca == -1) c->att_hb_hca = 16;
    if (c->topk_ilp < 0 || c->topk_ilp > 2) c->topk_ilp = -1;
    if (c->att_hb != 1 && c->att_hb != 2 && c->att_hb != 4 && c->att_hb != 8 && c->att_hb != 16) c->att_hb = 0;
    if (c->att_tc_hb != 16 && c->att_tc_hb != 32 && c->att_tc_hb != 64) c->att_tc_hb = 0;
    if (c->att_zb < 1 || c->att_zb > 64) c->att_zb = 1;
    if (c->att_hb_hca != 1 && c->att_hb_hca != 2 && c->att_hb_hca != 4 && c->att_hb_hca != 8 && c->att_hb_hca != 16)
        c->att_hb_hca = 0;
}

static int cu_link(void *ctx, void *peer_ctx, void *dst, const void *src, size_t bytes, ds4_err *err);

static const ds4_backend_ops cuda_ops = {
    "cuda",
    cu_destroy,
    cu_check_model,
    cu_bind_model,
    cu_unbind_model,
    cu_kv_row_type,
    cu_reserve,
    cu_alloc_op,
    cu_free_op,
    cu_upload_op,
    cu_download_op,
    cu_copy_op,
    cu_copy_many_op,
    cu_step_begin,
    cu_step_end,
    cu_forget,
    cu_argmax,
    prof_mark,
    prof_read,
    bandwidth,
    describe,
    cu_embed_j,
    cu_hc_pre_j,
    cu_attn_project,
    cu_compress_update_s,
    cu_indexer_select_j,
    cu_attention_j,
    cu_kv_store_j,
    cu_hc_post_j,
    cu_moe_route_j,
    cu_moe_experts_j,
    cu_head_j,
    cu_mtp_embed_j,
    cu_link,
};

/* Several backends in one thread (a layer split over GPUs): the current
 * device is per thread, so every op of such a backend selects its device
 * first. The single-device table above never does. */
template <auto F> struct on_dev;
template <typename R, typename... A, R (*F)(void *, A...)> struct on_dev<F> {
    static R call(void *ctx, A... a) {
        cudaSetDevice(((cu_ctx *)ctx)->device);
        return F(ctx, a...);
    }
};
#define OD(f) on_dev<f>::call
static const ds4_backend_ops cuda_ops_multi = {
    "cuda",
    OD(cu_destroy),
    OD(cu_check_model),
    OD(cu_bind_model),
    OD(cu_unbind_model),
    OD(cu_kv_row_type),
    OD(cu_reserve),
    OD(cu_alloc_op),
    OD(cu_free_op),
    OD(cu_upload_op),
    OD(cu_download_op),
    OD(cu_copy_op),
    OD(cu_copy_many_op),
    OD(cu_step_begin),
    OD(cu_step_end),
    OD(cu_forget),
    OD(cu_argmax),
    OD(prof_mark),
    OD(prof_read),
    OD(bandwidth),
    OD(describe),
    OD(cu_embed_j),
    OD(cu_hc_pre_j),
    OD(cu_attn_project),
    OD(cu_compress_update_s),
    OD(cu_indexer_select_j),
    OD(cu_attention_j),
    OD(cu_kv_store_j),
    OD(cu_hc_post_j),
    OD(cu_moe_route_j),
    OD(cu_moe_experts_j),
    OD(cu_head_j),
    OD(cu_mtp_embed_j),
    cu_link, /* selects each side's device itself */
};
#undef OD

extern "C" int ds4_cuda_backend_new(const ds4_cuda_opts *o, ds4_backend *out, ds4_err *err) {
    int n_dev = 0;
    cudaError_t e = cudaGetDeviceCount(&n_dev);
    if (e != cudaSuccess || n_dev == 0) {
        cudaGetLastError();
        return ds4_err_set(err, DS4_E_BACKEND, "cuda: no usable GPU (%s)",
                           e != cudaSuccess ? cudaGetErrorString(e) : "no devices");
    }
    int dev = o ? o->device : 0;
    if (dev < 0 || dev >= n_dev) return ds4_err_set(err, DS4_E_ARG, "cuda: device %d does not exist (%d present)", dev, n_dev);
    cu_ctx *c = (cu_ctx *)calloc(1, sizeof *c);
    if (!c) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    c->device = dev;
    c->sync_debug = o && o->sync_debug;
    c->no_graphs = o && o->no_graphs;
    c->profile = o && o->profile;
    cu_read_switches(c);
    cudaDeviceProp prop;
    bool ok = cu_ok(c, cudaSetDevice(dev), "set device") && cu_ok(c, cudaGetDeviceProperties(&prop, dev), "properties");
    if (ok) {
        c->n_sm = prop.multiProcessorCount;
        snprintf(c->dev_name, sizeof c->dev_name, "%s", prop.name);
        c->hc_split = 32;
        ok = cu_ok(c, cudaStreamCreateWithFlags(&c->st, cudaStreamNonBlocking), "stream") &&
             (c->no_side_stream ||
              (cu_ok(c, cudaStreamCreateWithFlags(&c->st2, cudaStreamNonBlocking), "stream") &&
               cu_ok(c, cudaEventCreateWithFlags(&c->ev_fork, cudaEventDisableTiming), "event") &&
               cu_ok(c, cudaEventCreateWithFlags(&c->ev_join, cudaEventDisableTiming), "event"))) &&
             (!c->idx_fork || c->no_side_stream ||
              (cu_ok(c, cudaStreamCreateWithFlags(&c->st4, cudaStreamNonBlocking), "stream") &&
               cu_ok(c, cudaEventCreateWithFlags(&c->ev_qa, cudaEventDisableTiming), "event") &&
               cu_ok(c, cudaEventCreateWithFlags(&c->ev_iq, cudaEventDisableTiming), "event"))) &&
             (!c->l2ahead ||
              (cu_ok(c, cudaStreamCreateWithFlags(&c->st3, cudaStreamNonBlocking), "stream") &&
               cu_ok(c, cudaEventCreateWithFlags(&c->ev_af, cudaEventDisableTiming), "event") &&
               cu_ok(c, cudaEventCreateWithFlags(&c->ev_aj, cudaEventDisableTiming), "event"))) &&
             cu_ok(c, cudaMalloc((void **)&c->dstatus, sizeof(int)), "status") &&
             cu_ok(c, cudaMemset(c->dstatus, 0, sizeof(int)), "status") &&
             cu_ok(c, cudaHostAlloc((void **)&c->hstatus, sizeof(int), cudaHostAllocDefault), "status") &&
             cu_ok(c, cudaMalloc((void **)&c->dids, 64 * sizeof(int32_t)), "argmax") &&
             cu_ok(c, cudaHostAlloc((void **)&c->hids, 64 * sizeof(int32_t), cudaHostAllocDefault), "argmax") &&
             cu_ok(c, cudaMalloc((void **)&c->grid, 256 * sizeof(uint64_t)), "tables") &&
             cu_ok(c, cudaMalloc((void **)&c->ksigns, 128), "tables") &&
             cu_ok(c, cudaMemcpy((void *)c->grid, ds4_iq2xxs_grid, 256 * sizeof(uint64_t), cudaMemcpyHostToDevice),
                   "tables") &&
             cu_ok(c, cudaMemcpy((void *)c->ksigns, ds4_ksigns_iq2xs, 128, cudaMemcpyHostToDevice), "tables");
        const int lt = c->early_trigger;
        if (ok && !(cu_sw_matvec(lt) && cu_sw_mm_f(lt) && cu_sw_mm_q8(lt) && cu_sw_attn(lt) && cu_sw_compress(lt) &&
                    cu_sw_moe(lt) && cu_sw_backend(lt) && cu_sw_blas(lt)))
            ok = cu_ok(c, cudaErrorInvalidValue, "device switches");
        if (ok && c->blas) ok = cu_blas_open(c);
#if CU_GTRACE
        if (ok && c->gtrace) {
            const unsigned off = CU_GT_CAP;
            cu_gt_rec *b = nullptr;
            ok = cu_ok(c, cudaMalloc((void **)&c->gt_ctr, sizeof(unsigned)), "gtrace") &&
                 cu_ok(c, cudaMemcpy(c->gt_ctr, &off, sizeof off, cudaMemcpyHostToDevice), "gtrace") &&
                 cu_ok(c, cudaMalloc((void **)&b, (size_t)CU_GT_CAP * sizeof(cu_gt_rec)), "gtrace");
            c->gt_buf = b;
            if (ok && !(cu_sw_matvec_gt(c->gt_ctr, b) && cu_sw_mm_f_gt(c->gt_ctr, b) && cu_sw_mm_q8_gt(c->gt_ctr, b) &&
                        cu_sw_attn_gt(c->gt_ctr, b) && cu_sw_compress_gt(c->gt_ctr, b) && cu_sw_moe_gt(c->gt_ctr, b) &&
                        cu_sw_backend_gt(c->gt_ctr, b) && cu_sw_blas_gt(c->gt_ctr, b)))
                ok = cu_ok(c, cudaErrorInvalidValue, "gtrace switches");
        }
#else
        if (c->gtrace) fprintf(stderr, "ds4: cuda: DS4_CUDA_GTRACE needs a build with NVDEFS=-DCU_GTRACE=1; ignored\n");
#endif
    }
    if (!ok) {
        int rc = ds4_err_set(err, c->err ? c->err : DS4_E_BACKEND, "%s", c->msg);
        cu_destroy(c);
        return rc;
    }
    out->ops = o && o->multi ? &cuda_ops_multi : &cuda_ops;
    out->ctx = c;
    return 0;
}

/* A library loaded at run time (NCCL, cuBLAS): the file named by the
 * environment variable env, else name, else fallback; slots[i] takes the
 * address of syms[i]. NULL or a missing symbol: why says what failed. */
void *cu_dl_load(const char *what, const char *env, const char *name, const char *fallback, const char *const *syms,
                 void **const *slots, int n, char *why, size_t cap) {
    const char *e = getenv(env);
    const char *names[] = {e && *e ? e : name, fallback};
    void *lib = dlopen(names[0], RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        const char *first = dlerror();
        snprintf(why, cap, "cannot load %s (%s; set %s to %s)", what, first ? first : names[0], env, name);
        lib = dlopen(names[1], RTLD_NOW | RTLD_LOCAL);
        if (!lib) return nullptr;
        why[0] = 0;
    }
    for (int i = 0; i < n; i++)
        if (!(*slots[i] = dlsym(lib, syms[i])) && !why[0]) snprintf(why, cap, "the %s library lacks %s", what, syms[i]);
    return lib;
}

/* ---------------------------------------------------------------- NCCL link
 *
 * The HC states of a layer split pass between parts through NCCL, loaded
 * at run time (libnccl.so.2) so that single-GPU use needs no NCCL. One
 * communicator per split, one rank per distinct device (ncclCommInitAll);
 * two parts on one device share its rank and send to themselves. */
#if __has_include(<nccl.h>)
#include <nccl.h>
#define CU_NCCL 1
static struct {
    pthread_mutex_t mu;
    bool tried;
    void *lib;
    char why[256];
    decltype(&ncclCommInitAll) init_all;
    decltype(&ncclCommDestroy) destroy;
    decltype(&ncclGroupStart) group_start;
    decltype(&ncclGroupEnd) group_end;
    decltype(&ncclSend) send;
    decltype(&ncclRecv) recv;
    decltype(&ncclGetErrorString) error_string;
    decltype(&ncclGetVersion) version;
} nccl = {PTHREAD_MUTEX_INITIALIZER};

static bool nccl_load(void) {
    pthread_mutex_lock(&nccl.mu);
    if (!nccl.tried) {
        nccl.tried = true;
        const char *syms[] = {"ncclCommInitAll", "ncclCommDestroy", "ncclGroupStart", "ncclGroupEnd",
                              "ncclSend", "ncclRecv", "ncclGetErrorString", "ncclGetVersion"};
        void **slots[] = {(void **)&nccl.init_all, (void **)&nccl.destroy, (void **)&nccl.group_start,
                          (void **)&nccl.group_end, (void **)&nccl.send, (void **)&nccl.recv,
                          (void **)&nccl.error_string, (void **)&nccl.version};
        nccl.lib = cu_dl_load("NCCL", "DS4_NCCL_LIB", "libnccl.so.2", "libnccl.so", syms, slots, 8, nccl.why,
                              sizeof nccl.why);
    }
    bool ok = nccl.lib && !nccl.why[0];
    pthread_mutex_unlock(&nccl.mu);
    return ok;
}

static void nccl_comm_destroy(void *comm) {
    if (comm && nccl.destroy) nccl.destroy((ncclComm_t)comm);
}

extern "C" int ds4_cuda_link_parts(ds4_backend *bes, int n, ds4_err *err) {
    if (n < 2) return 0;
    if (!nccl_load()) return ds4_err_set(err, DS4_E_BACKEND, "cuda: a split over GPUs needs NCCL: %s", nccl.why);
    int devs[64], nd = 0;
    int rank_of[64];
    for (int i = 0; i < n; i++) {
        if (bes[i].ops != &cuda_ops_multi)
            return ds4_err_set(err, DS4_E_INTERNAL, "cuda: part %d was not created for a split", i);
        int d = ((cu_ctx *)bes[i].ctx)->device, r = 0;
        while (r < nd && devs[r] != d) r++;
        if (r == nd) devs[nd++] = d;
        rank_of[i] = r;
    }
    ncclComm_t comms[64];
    ncclResult_t nr = nccl.init_all(comms, nd, devs);
    if (nr != ncclSuccess)
        return ds4_err_set(err, DS4_E_BACKEND, "cuda: NCCL communicator over %d devices: %s", nd, nccl.error_string(nr));
    for (int i = 0; i < n; i++) {
        cu_ctx *c = (cu_ctx *)bes[i].ctx;
        c->rank = rank_of[i];
        c->comm = comms[rank_of[i]];
        c->comm_owner = true;
        for (int j = 0; j < i; j++) c->comm_owner &= rank_of[j] != rank_of[i];
    }
    return 0;
}

static int cu_link(void *ctx, void *peer_ctx, void *dst, const void *src, size_t bytes, ds4_err *err) {
    cu_ctx *a = (cu_ctx *)ctx, *b = (cu_ctx *)peer_ctx;
    if (!a->comm || !b->comm) return ds4_err_set(err, DS4_E_INTERNAL, "cuda: link between backends without NCCL");
    cudaSetDevice(a->device);
    cu_join(a);
    cudaSetDevice(b->device);
    cu_join(b);
    ncclResult_t r = nccl.group_start();
    if (r == ncclSuccess) {
        cudaSetDevice(a->device);
        r = nccl.send(src, bytes, ncclUint8, b->rank, (ncclComm_t)a->comm, a->st);
        cudaSetDevice(b->device);
        ncclResult_t r2 = nccl.recv(dst, bytes, ncclUint8, a->rank, (ncclComm_t)b->comm, b->st);
        ncclResult_t r3 = nccl.group_end();
        r = r != ncclSuccess ? r : r2 != ncclSuccess ? r2 : r3;
    }
    if (r != ncclSuccess)
        return ds4_err_set(err, DS4_E_BACKEND, "cuda: NCCL transfer of %zu bytes from device %d to %d: %s", bytes,
                           a->device, b->device, nccl.error_string(r));
    return 0;
}
#else
static void nccl_comm_destroy(void *comm) { (void)comm; }

extern "C" int ds4_cuda_link_parts(ds4_backend *bes, int n, ds4_err *err) {
    (void)bes;
    if (n < 2) return 0;
    return ds4_err_set(err, DS4_E_BACKEND, "cuda: this build has no NCCL (nccl.h was not found at build time): "
                                           "a split over GPUs needs it");
}

static int cu_link(void *ctx, void *peer_ctx, void *dst, const void *src, size_t bytes, ds4_err *err) {
    (void)ctx, (void)peer_ctx, (void)dst, (void)src, (void)bytes;
    return ds4_err_set(err, DS4_E_INTERNAL, "cuda: this build has no NCCL");
}
#endif

CU_TU_SWITCHES(cu_sw_backend)
