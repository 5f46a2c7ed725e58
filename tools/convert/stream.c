/* stream.c - the tensor data of ds4-convert: each planned tensor is produced
 * at write time from its mmap'ed source (or the demo model's seeded
 * generator), decoded to f32 (F32/F16/BF16, the official FP8 E4M3 and packed
 * FP4 E2M1 with ue8m0 scales, docs/FORMATS.md E.3) and converted to its
 * output type.
 *
 * Memory is bounded independently of the model: a tensor is processed in
 * chunks of rows (at most CHUNK_BYTES of f32 plus their encoded bytes), each
 * chunk decoded and quantized on n_threads threads (rows split between
 * them), then written in order. The output is deterministic whatever the
 * thread count: every row is converted by the same code from the same input,
 * and the one cross-row quantity, IQ2_XXS's synthetic importance
 * (sum over rows of x^2 per column, docs/FORMATS.md C.6), is summed per
 * column in row order, exactly as ds4_quantize_rows does.
 *
 * Progress (stderr, when asked): tensor, GB of input done, rate, ETA.
 * Cancellation (a signal setting *opt.cancel) is checked before every chunk.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "convert.h"
#include "quant.h"

#define CHUNK_BYTES (8u << 20) /* f32 bytes of one chunk of rows */
#define MAX_THREADS 256

/* ------------------------------------------------------------ progress */

static struct {
    ds4_conv_stream_opts opt;
    int n_tensors, i_tensor;
    uint64_t total_in, done_in;
    double t0, last_print;
} g;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void progress(const char *name, bool force) {
    if (!g.opt.progress) return;
    double t = now_s();
    if (!force && t - g.last_print < 0.5) return;
    g.last_print = t;
    double el = t - g.t0, rate = el > 0 ? (double)g.done_in / el : 0;
    double eta = rate > 0 ? (double)(g.total_in - g.done_in) / rate : 0;
    fprintf(stderr, "\r[%4d/%d] %-36.36s %7.2f/%.2f GB  %6.1f MB/s  ETA %dm%02ds ", g.i_tensor, g.n_tensors, name,
            (double)g.done_in / 1e9, (double)g.total_in / 1e9, rate / 1e6, (int)(eta / 60), (int)eta % 60);
    if (force && g.i_tensor == g.n_tensors) fputc('\n', stderr);
    fflush(stderr);
}

void ds4_conv_stream_totals(double *seconds, uint64_t *in_bytes, int *n_threads) {
    *seconds = g.i_tensor ? now_s() - g.t0 : 0;
    *in_bytes = g.done_in;
    *n_threads = g.opt.n_threads;
}

/* ------------------------------------------------------------ sources */

/* Seeded generator of the demo model: splitmix64 per row, so every row is
 * reproducible independently of the order in which rows are produced. */
static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double rand_unit(uint64_t *s) { return (double)(splitmix64(s) >> 11) * (1.0 / 9007199254740992.0); }

static void random_row(const ds4_conv_tensor *t, int64_t row_index, float *dst, int64_t n) {
    uint64_t s = t->seed ^ (0xD1B54A32D192ED03ull * (uint64_t)(row_index + 1));
    for (int64_t i = 0; i < n; i++) {
        if (t->rand == DS4_RAND_UNIFORM) {
            dst[i] = (float)(t->ra + (t->rb - t->ra) * rand_unit(&s));
        } else {
            double u1 = rand_unit(&s), u2 = rand_unit(&s);
            if (u1 < 1e-300) u1 = 1e-300;
            dst[i] = (float)(t->ra + t->rb * sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
        }
    }
}

/* Row `row` (of n values) of source s viewed as a matrix of rows of n
 * logical values, as float. sc: the ue8m0 scales of an FP8/FP4 s. The FP8
 * and FP4 products are exact in f32 (a power-of-two scale times a code of
 * at most 4 significant bits), so this equals the official dequantization
 * bit for bit. */
static void decode_row(const ds4_st_tensor *s, const ds4_st_tensor *sc, int64_t row, int64_t n, float *dst) {
    if (s->dtype == DS4_ST_F8_E4M3) {
        const int64_t n_tiles = (n + 127) / 128;
        ds4_fp8_dequant_row(s->data + (uint64_t)(row * n), sc->data + (uint64_t)((row / 128) * n_tiles), dst, n);
        return;
    }
    if (s->dtype == DS4_ST_I8 || s->dtype == DS4_ST_U8) {
        ds4_fp4_dequant_row(s->data + (uint64_t)(row * (n / 2)), sc->data + (uint64_t)(row * (n / 32)), dst, n);
        return;
    }
    const uint8_t *p = s->data + (uint64_t)(row * n) * (uint64_t)ds4_st_dtype_size(s->dtype);
    for (int64_t i = 0; i < n; i++) {
        if (s->dtype == DS4_ST_F32) {
            memcpy(&dst[i], p + 4 * i, 4);
        } else {
            uint16_t h = (uint16_t)(p[2 * i] | p[2 * i + 1] << 8);
            dst[i] = s->dtype == DS4_ST_F16 ? ds4_f16_to_f32(h) : ds4_bf16_to_f32(h);
        }
    }
}

/* Row r of matrix m of t as float (n = ne[0] values). */
static void source_row(const ds4_conv_tensor *t, int64_t m, int64_t r, float *dst) {
    const int64_t n_in = t->ne[0], n_out = t->ne[1];
    switch (t->src) {
    case DS4_SRC_PLAIN: decode_row(t->st, t->scale, m * n_out + r, n_in, dst); break;
    case DS4_SRC_EXPERTS: decode_row(t->experts[m], t->expert_scales[m], r, n_in, dst); break;
    case DS4_SRC_FUSED_LO: decode_row(t->st, NULL, m * 2 * n_out + r, n_in, dst); break;
    case DS4_SRC_FUSED_HI: decode_row(t->st, NULL, m * 2 * n_out + n_out + r, n_in, dst); break;
    case DS4_SRC_RANDOM: random_row(t, m * n_out + r, dst, n_in); break;
    case DS4_SRC_NONE: break;
    }
}

static uint64_t st_bytes(const ds4_st_tensor *s) { return s ? s->n_bytes : 0; }

uint64_t ds4_conv_tensor_src_bytes(const ds4_conv_tensor *t) {
    switch (t->src) {
    case DS4_SRC_PLAIN: return st_bytes(t->st) + st_bytes(t->scale);
    case DS4_SRC_FUSED_LO:
    case DS4_SRC_FUSED_HI: return st_bytes(t->st) / 2;
    case DS4_SRC_EXPERTS: {
        uint64_t n = 0;
        for (int64_t m = 0; m < t->ne[2]; m++) n += st_bytes(t->experts[m]) + st_bytes(t->expert_scales[m]);
        return n;
    }
    case DS4_SRC_RANDOM: return (uint64_t)(t->ne[0] * t->ne[1] * t->ne[2]) * 4;
    case DS4_SRC_NONE: break;
    }
    return 0;
}

/* Bytes of one stored row of s holding n logical values. */
static uint64_t src_row_bytes(const ds4_st_tensor *s, int64_t n) {
    if (s->dtype == DS4_ST_F8_E4M3) return (uint64_t)n;
    if (s->dtype == DS4_ST_I8 || s->dtype == DS4_ST_U8) return (uint64_t)n / 2;
    return (uint64_t)n * (uint64_t)ds4_st_dtype_size(s->dtype);
}

/* Drops the mapped pages of rows [r0, r1) of matrix m from the process
 * (MADV_DONTNEED; they stay in the page cache and fault back in if read
 * again), so the resident set stays at one chunk instead of growing with
 * the model: the sources are read once, in order. */
static void drop_pages(const uint8_t *lo, const uint8_t *hi) {
    const uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t a = ((uintptr_t)lo + pg - 1) & ~(pg - 1), b = (uintptr_t)hi & ~(pg - 1); /* whole pages inside */
    if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
}

static void release_rows(const ds4_conv_tensor *t, int64_t m, int64_t r0, int64_t r1) {
    const bool plain = t->src == DS4_SRC_PLAIN;
    const ds4_st_tensor *s = plain ? t->st : t->src == DS4_SRC_EXPERTS ? t->experts[m] : NULL;
    const ds4_st_tensor *sc = plain ? t->scale : t->src == DS4_SRC_EXPERTS ? t->expert_scales[m] : NULL;
    if (!s) return;
    const uint64_t rb = src_row_bytes(s, t->ne[0]);
    const int64_t base = plain ? m * t->ne[1] : 0;
    drop_pages(s->data + (uint64_t)(base + r0) * rb, s->data + (uint64_t)(base + r1) * rb);
    if (sc && s->dtype != DS4_ST_F8_E4M3) {   /* FP4: one scale row per row (FP8 tiles are negligible) */
        const uint64_t sb = (uint64_t)t->ne[0] / 32;
        drop_pages(sc->data + (uint64_t)r0 * sb, sc->data + (uint64_t)r1 * sb);
    }
}

/* ------------------------------------------------------------ parallel chunks */

/* One chunk of rows [r0, r1) of matrix m: decoded into f (rows of ne[0]
 * floats), encoded into out (rows of row_bytes). */
typedef struct chunk {
    const ds4_conv_tensor *t;
    int64_t m, r0, r1;
    float *f;
    uint8_t *out;
    size_t row_bytes;
    const float *imp;   /* importance of matrix m, or NULL */
    float *acc;         /* pass 1 of IQ2_XXS: column sums of squares */
} chunk;

typedef struct worker {
    chunk *c;
    int64_t i0, i1;     /* rows (decode/encode) or columns (accumulate) */
    int op;
    int rc;
    ds4_err err;
} worker;

enum { OP_DECODE, OP_ACCUMULATE, OP_ENCODE };

static int decode_rows(chunk *c, int64_t i0, int64_t i1, ds4_err *err) {
    const ds4_conv_tensor *t = c->t;
    const int64_t n = t->ne[0];
    for (int64_t i = i0; i < i1; i++) {
        float *row = c->f + (size_t)(i - c->r0) * (size_t)n;
        source_row(t, c->m, i, row);
        for (int64_t k = 0; k < n; k++)
            if (!isfinite(row[k]))
                return ds4_err_set(err, DS4_E_MODEL, "tensor '%s' (matrix %lld, row %lld) has a non-finite value at "
                                   "column %lld%s", t->name, (long long)c->m, (long long)i, (long long)k,
                                   (t->scale || (t->expert_scales && t->expert_scales[c->m]))
                                       ? " (FP8 NaN code or ue8m0 scale 255?)" : "");
    }
    return 0;
}

/* Columns [i0, i1): acc[k] += x[r][k]^2 for the chunk's rows in order. */
static void accumulate_cols(chunk *c, int64_t i0, int64_t i1) {
    const int64_t n = c->t->ne[0];
    for (int64_t r = c->r0; r < c->r1; r++) {
        const float *row = c->f + (size_t)(r - c->r0) * (size_t)n;
        for (int64_t k = i0; k < i1; k++) c->acc[k] += row[k] * row[k];
    }
}

static int encode_rows(chunk *c, int64_t i0, int64_t i1, ds4_err *err) {
    const ds4_conv_tensor *t = c->t;
    const int64_t n = t->ne[0];
    for (int64_t i = i0; i < i1; i++) {
        const float *row = c->f + (size_t)(i - c->r0) * (size_t)n;
        uint8_t *dst = c->out + (size_t)(i - c->r0) * c->row_bytes;
        if (t->type == DS4_GGML_F32) {
            memcpy(dst, row, c->row_bytes);
        } else if (t->type == DS4_GGML_F16) {
            for (int64_t k = 0; k < n; k++) {
                uint16_t h = ds4_f32_to_f16(row[k]);
                if ((h & 0x7c00) == 0x7c00)
                    return ds4_err_set(err, DS4_E_MODEL, "tensor '%s' (matrix %lld, row %lld): %g overflows F16",
                                       t->name, (long long)c->m, (long long)i, (double)row[k]);
                memcpy(dst + 2 * k, &h, 2);
            }
        } else if (ds4_quantize_row((int)t->type, row, dst, n, c->imp) != c->row_bytes) {
            float amax = 0;
            for (int64_t k = 0; k < n; k++)
                if (fabsf(row[k]) > amax) amax = fabsf(row[k]);
            return ds4_err_set(err, DS4_E_MODEL, "tensor '%s': %s quantization of matrix %lld row %lld failed "
                               "(a non-finite value or importance, or values too large for the type's F16 block "
                               "scales: largest |value| %g)", t->name, ds4_ggml_type_name(t->type),
                               (long long)c->m, (long long)i, (double)amax);
        }
    }
    return 0;
}

static void *work(void *arg) {
    worker *w = arg;
    if (w->op == OP_DECODE) w->rc = decode_rows(w->c, w->i0, w->i1, &w->err);
    else if (w->op == OP_ENCODE) w->rc = encode_rows(w->c, w->i0, w->i1, &w->err);
    else accumulate_cols(w->c, w->i0, w->i1);
    return NULL;
}

/* Runs op over [lo, hi) split into n_threads contiguous parts; the caller's
 * thread does the first part. Returns the first failing part's error. */
static int parallel(chunk *c, int op, int64_t lo, int64_t hi, ds4_err *err) {
    int nt = g.opt.n_threads > 0 ? g.opt.n_threads : 1;
    if (nt > hi - lo) nt = (int)(hi - lo > 0 ? hi - lo : 1);
    worker w[MAX_THREADS];
    pthread_t th[MAX_THREADS];
    bool started[MAX_THREADS] = {false};
    for (int k = 0; k < nt; k++)
        w[k] = (worker){c, lo + (hi - lo) * k / nt, lo + (hi - lo) * (k + 1) / nt, op, 0, {0}};
    for (int k = 1; k < nt; k++) started[k] = pthread_create(&th[k], NULL, work, &w[k]) == 0;
    work(&w[0]);
    for (int k = 1; k < nt; k++) {
        if (started[k]) pthread_join(th[k], NULL);
        else work(&w[k]);          /* no thread: do its part here */
    }
    for (int k = 0; k < nt; k++)
        if (w[k].rc) {
            if (err) *err = w[k].err;
            return w[k].rc;
        }
    return 0;
}

/* ------------------------------------------------------------ background writes */

/* The encoded chunk goes to the writer on its own thread while the next
 * chunk is decoded and encoded (two output buffers), so disk writes and
 * quantization overlap. Writes stay one at a time and in order. */
typedef struct bg_write {
    ds4_gguf_sink *sink;
    const uint8_t *buf;
    size_t n;
    int rc;
    ds4_err err;
    pthread_t th;
    bool running;
} bg_write;

static void *bg_write_run(void *p) {
    bg_write *b = p;
    b->rc = ds4_gguf_sink_write(b->sink, b->buf, b->n, &b->err);
    return NULL;
}

static int bg_wait(bg_write *b, ds4_err *err) {
    if (!b->running) return 0;
    pthread_join(b->th, NULL);
    b->running = false;
    if (b->rc && err) *err = b->err;
    return b->rc;
}

static int bg_start(bg_write *b, const uint8_t *buf, size_t n, ds4_err *err) {
    b->buf = buf;
    b->n = n;
    b->rc = 0;
    if (pthread_create(&b->th, NULL, bg_write_run, b) == 0) {
        b->running = true;
        return 0;
    }
    return ds4_gguf_sink_write(b->sink, buf, n, err);   /* no thread: write here */
}

/* ------------------------------------------------------------ producers */

/* Every chunk of rows starts here: the --debug-chunk-delay-ms pause (cut
 * short by a signal), then DS4_E_CANCEL once a signal asked to stop, so an
 * interrupted conversion ends within one chunk and the writer removes its
 * temporary file. */
static int chunk_boundary(const ds4_conv_tensor *t, ds4_err *err) {
    if (g.opt.delay_ms > 0) {
        struct timespec ts = {g.opt.delay_ms / 1000, (long)(g.opt.delay_ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    if (g.opt.cancel && *g.opt.cancel)
        return ds4_err_set(err, DS4_E_CANCEL, "interrupted while converting '%s'", t->name);
    return 0;
}

/* Expert ids (I32): int64/int32 source or seeded, range-checked. */
static int produce_ids(const ds4_conv_tensor *t, ds4_gguf_sink *sink, ds4_err *err) {
    const int64_t n_in = t->ne[0];
    int rc = chunk_boundary(t, err);
    if (rc) return rc;
    int32_t *ids = malloc((size_t)n_in * sizeof *ids);
    if (!ids) return ds4_err_set(err, DS4_E_NOMEM, "out of memory converting '%s'", t->name);
    for (int64_t r = 0; r < t->ne[1] && !rc; r++) {
        for (int64_t i = 0; i < n_in; i++) {
            int64_t v;
            if (t->src == DS4_SRC_RANDOM) {             /* with replacement: repeats allowed */
                uint64_t s = t->seed ^ (0xA0761D6478BD642Full * (uint64_t)(r * n_in + i + 1));
                v = (int64_t)(splitmix64(&s) % (uint64_t)t->rb);
            } else if (t->st->dtype == DS4_ST_I64) {
                memcpy(&v, t->st->data + 8 * (uint64_t)(r * n_in + i), 8);
            } else {
                int32_t v32;
                memcpy(&v32, t->st->data + 4 * (uint64_t)(r * n_in + i), 4);
                v = v32;
            }
            if (v < 0 || v >= (int64_t)t->rb) {
                rc = ds4_err_set(err, DS4_E_MODEL, "tensor '%s': token %lld slot %lld has expert id %lld, "
                                 "expected 0..%lld", t->name, (long long)r, (long long)i, (long long)v,
                                 (long long)t->rb - 1);
                break;
            }
            ids[i] = (int32_t)v;
        }
        if (!rc) rc = ds4_gguf_sink_write(sink, ids, (size_t)n_in * 4, err);
    }
    free(ids);
    return rc;
}

/* Producer of one planned tensor (ds4_gguf_produce_fn). */
static int produce(void *user, int64_t index, ds4_gguf_sink *sink, ds4_err *err) {
    (void)index;
    const ds4_conv_tensor *t = user;
    if (g.i_tensor++ == 0) g.t0 = g.last_print = now_s();   /* the clock starts with the tensor data */
    if (t->type == DS4_GGML_I32) {
        int rc = produce_ids(t, sink, err);
        g.done_in += ds4_conv_tensor_src_bytes(t);
        progress(t->name, g.i_tensor == g.n_tensors);
        return rc;
    }
    const int64_t n_in = t->ne[0], n_out = t->ne[1];
    const size_t row_bytes = ds4_type_row_bytes((int)t->type, n_in);
    int64_t rows = (int64_t)(CHUNK_BYTES / ((size_t)n_in * sizeof(float)));
    if (rows < 1) rows = 1;
    if (rows > n_out) rows = n_out;
    const uint64_t in_per_row = ds4_conv_tensor_src_bytes(t) / (uint64_t)(n_out * t->ne[2]);
    chunk c = {.t = t, .row_bytes = row_bytes};
    c.f = malloc((size_t)rows * (size_t)n_in * sizeof(float));
    uint8_t *outs[2] = {malloc((size_t)rows * row_bytes), malloc((size_t)rows * row_bytes)};
    int cur = 0;
    bg_write bw = {.sink = sink};
    float *acc = NULL;
    const bool synth = t->type == DS4_GGML_IQ2_XXS && !t->imatrix;  /* synthetic importance, C.6 */
    if (synth) acc = malloc((size_t)n_in * sizeof(float));
    int rc = 0;
    if (!c.f || !outs[0] || !outs[1] || row_bytes == 0 || (synth && !acc)) {
        rc = ds4_err_set(err, DS4_E_NOMEM, "out of memory converting '%s'", t->name);
        goto done;
    }
    for (int64_t m = 0; m < t->ne[2] && !rc; m++) {
        c.m = m;
        c.imp = t->imatrix ? t->imatrix + (t->imatrix_per_matrix ? m * n_in : 0) : NULL;
        if (synth) {            /* pass 1: column sums of squares of this matrix, rows in order */
            memset(acc, 0, (size_t)n_in * sizeof(float));
            c.acc = acc;
            for (int64_t r0 = 0; r0 < n_out && !rc; r0 += rows) {
                c.r0 = r0;
                c.r1 = r0 + rows < n_out ? r0 + rows : n_out;
                if ((rc = chunk_boundary(t, err))) break;
                if (!(rc = parallel(&c, OP_DECODE, c.r0, c.r1, err))) parallel(&c, OP_ACCUMULATE, 0, n_in, NULL);
            }
            c.imp = acc;
        }
        for (int64_t r0 = 0; r0 < n_out && !rc; r0 += rows) {
            c.r0 = r0;
            c.r1 = r0 + rows < n_out ? r0 + rows : n_out;
            c.out = outs[cur];       /* its previous write finished before the last bg_start */
            if ((rc = chunk_boundary(t, err))) break;
            if ((rc = parallel(&c, OP_DECODE, c.r0, c.r1, err))) break;
            release_rows(t, m, c.r0, c.r1);
            if ((rc = parallel(&c, OP_ENCODE, c.r0, c.r1, err))) break;
            if ((rc = bg_wait(&bw, err))) break;
            rc = bg_start(&bw, c.out, (size_t)(c.r1 - c.r0) * row_bytes, err);
            cur ^= 1;
            g.done_in += in_per_row * (uint64_t)(c.r1 - c.r0);
            progress(t->name, false);
        }
    }
    {
        int wrc = bg_wait(&bw, rc ? NULL : err);
        if (!rc) rc = wrc;
    }
    progress(t->name, g.i_tensor == g.n_tensors);
done:
    free(c.f);
    free(outs[0]);
    free(outs[1]);
    free(acc);
    return rc;
}

int ds4_conv_add_tensors_opts(ds4_gguf_writer *w, ds4_conv_plan *p, const ds4_conv_stream_opts *opt, ds4_err *err) {
    memset(&g, 0, sizeof g);
    g.opt = *opt;
    if (g.opt.n_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        g.opt.n_threads = n > 0 ? (int)n : 1;
    }
    if (g.opt.n_threads > MAX_THREADS) g.opt.n_threads = MAX_THREADS;
    for (int i = 0; i < p->n; i++) {
        ds4_conv_tensor *t = &p->t[i];
        if (t->src == DS4_SRC_NONE) continue;          /* optional and absent */
        int64_t ne[3] = {t->ne[0], t->ne[1], t->ne[2]};
        if (ds4_gguf_writer_add_tensor_cb(w, t->name, t->type, (uint32_t)t->n_dims, ne, produce, t) < 0)
            return ds4_err_set(err, DS4_E_ARG, "cannot add tensor '%s' (%s, ne[0] = %lld) to the GGUF writer",
                               t->name, ds4_ggml_type_name(t->type), (long long)t->ne[0]);
        g.n_tensors++;
        g.total_in += ds4_conv_tensor_src_bytes(t);
    }
    return 0;
}
