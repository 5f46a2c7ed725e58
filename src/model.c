/* model.c - hyperparameters from GGUF metadata, per-layer kinds, and the
 * name -> typed-weight table with shape/type validation (docs/MODEL.md §A-§B).
 *
 * Invariants after a successful ds4_model_load: every ds4_weight points
 * inside the mapping with exactly n_mat*n_out*row_bytes bytes, its type is
 * supported by quant.h for its row length, every owned vector has the
 * expected length, tid2eid entries are valid expert ids, and the layer kinds
 * agree with compress_ratios.
 */
#include "model.h"
#include "util/utf8.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quant.h"

/* ------------------------------------------------------------ metadata */

static int find_kv(const ds4_gguf *g, const char *key, bool required, int64_t *kv,
                   ds4_err *err) {
    *kv = ds4_gguf_find_key(g, key);
    if (*kv < 0 && required)
        return ds4_err_set(err, DS4_E_MODEL, "metadata key '%s' is missing", key);
    return 0;
}

/* Integer key of any integer type (ds4 writes UINT32; UINT64 and signed
 * forms are accepted when the value fits). Range-checked to [lo, hi]. */
static int get_int(const ds4_gguf *g, const char *key, bool required, int64_t lo, int64_t hi,
                   int64_t dflt, int64_t *out, ds4_err *err) {
    int64_t kv;
    int rc = find_kv(g, key, required, &kv, err);
    if (rc) return rc;
    if (kv < 0) { *out = dflt; return 0; }
    ds4_gguf_value v;
    uint32_t t = ds4_gguf_kv_type(g, kv);
    if (t == DS4_GGUF_ARR || ds4_gguf_kv_value(g, kv, &v) != 0)
        return ds4_err_set(err, DS4_E_MODEL, "metadata key '%s' has type %s, expected an integer",
                           key, ds4_gguf_vtype_name(t));
    int64_t x;
    switch (t) {
    case DS4_GGUF_U8: case DS4_GGUF_U16: case DS4_GGUF_U32: case DS4_GGUF_U64:
        if (v.v.u64 > (uint64_t)INT64_MAX) goto range;
        x = (int64_t)v.v.u64; break;
    case DS4_GGUF_I8: case DS4_GGUF_I16: case DS4_GGUF_I32: case DS4_GGUF_I64:
        x = v.v.i64; break;
    default:
        return ds4_err_set(err, DS4_E_MODEL, "metadata key '%s' has type %s, expected an integer",
                           key, ds4_gguf_vtype_name(t));
    }
    if (x < lo || x > hi) goto range;
    *out = x;
    return 0;
range:
    return ds4_err_set(err, DS4_E_MODEL, "metadata key '%s' = %lld is out of range %lld..%lld",
                       key, (long long)(t == DS4_GGUF_U64 ? (long long)v.v.u64 : (long long)v.v.i64),
                       (long long)lo, (long long)hi);
}

/* A float hyperparameter and the range (lo, hi] the loader accepts (model.h) */
typedef struct { const char *key; double v, lo, hi; } hp_range;

/* 0, or DS4_E_MODEL naming the first value outside its range */
static int check_ranges(const hp_range *r, size_t n, ds4_err *err) {
    for (size_t i = 0; i < n; i++)
        if (!ds4_in_range(r[i].v, r[i].lo, r[i].hi))
            return ds4_err_set(err, DS4_E_MODEL, "metadata key '%s' is %g, expected a value in (%g, %g]", r[i].key,
                               r[i].v, r[i].lo, r[i].hi);
    return 0;
}

static int get_dim(const ds4_gguf *g, const char *key, int lo, int hi, int *out, ds4_err *err) {
    int64_t x;
    int rc = get_int(g, key, true, lo, hi, 0, &x, err);
    if (!rc) *out = (int)x;
    return rc;
}

/* Float key: F32/F64 or an integer type (as ds4 accepts). */
static int get_float(const ds4_gguf *g, const char *key, bool required, double dflt, float *out,
                     ds4_err *err) {
    int64_t kv;
    int rc = find_kv(g, key, required, &kv, err);
    if (rc) return rc;
    if (kv < 0) { *out = (float)dflt; return 0; }
    ds4_gguf_value v;
    uint32_t t = ds4_gguf_kv_type(g, kv);
    if (t == DS4_GGUF_ARR || ds4_gguf_kv_value(g, kv, &v) != 0) goto bad;
    double x;
    switch (t) {
    case DS4_GGUF_F32: case DS4_GGUF_F64: x = v.v.f64; break;
    case DS4_GGUF_U8: case DS4_GGUF_U16: case DS4_GGUF_U32: case DS4_GGUF_U64: x = (double)v.v.u64; break;
    case DS4_GGUF_I8: case DS4_GGUF_I16: case DS4_GGUF_I32: case DS4_GGUF_I64: x = (double)v.v.i64; break;
    default: goto bad;
    }
    if (!isfinite(x))
        return ds4_err_set(err, DS4_E_MODEL, "metadata key '%s' is not finite", key);
    *out = (float)x;
    return 0;
bad:
    return ds4_err_set(err, DS4_E_MODEL, "metadata key '%s' has type %s, expected a number", key,
                       ds4_gguf_vtype_name(t));
}

static int get_bool(const ds4_gguf *g, const char *key, bool required, bool dflt, bool *out,
                    ds4_err *err) {
    int64_t kv;
    int rc = find_kv(g, key, required, &kv, err);
    if (rc) return rc;
    if (kv < 0) { *out = dflt; return 0; }
    ds4_gguf_value v;
    uint32_t t = ds4_gguf_kv_type(g, kv);
    if (t != DS4_GGUF_BOOL || ds4_gguf_kv_value(g, kv, &v) != 0)
        return ds4_err_set(err, DS4_E_MODEL, "metadata key '%s' has type %s, expected BOOL", key,
                           ds4_gguf_vtype_name(t));
    *out = v.v.u64 != 0;
    return 0;
}

/* Per-layer array (length >= n, only the first n entries used). */
static int get_layer_array(const ds4_gguf *g, const char *key, int n, bool is_float, int *iout,
                           float *fout, ds4_err *err) {
    int64_t kv;
    int rc = find_kv(g, key, true, &kv, err);
    if (rc) return rc;
    if (ds4_gguf_kv_type(g, kv) != DS4_GGUF_ARR)
        return ds4_err_set(err, DS4_E_MODEL, "metadata key '%s' has type %s, expected an array", key,
                           ds4_gguf_vtype_name(ds4_gguf_kv_type(g, kv)));
    uint64_t len = ds4_gguf_arr_n(g, kv);
    if (len < (uint64_t)n)
        return ds4_err_set(err, DS4_E_MODEL,
                           "metadata key '%s' has %llu entries, expected at least block_count = %d",
                           key, (unsigned long long)len, n);
    for (int i = 0; i < n; i++) {
        if (is_float) {
            double d;
            if (ds4_gguf_arr_f64(g, kv, (uint64_t)i, &d) != 0 || !isfinite(d))
                return ds4_err_set(err, DS4_E_MODEL, "metadata key '%s'[%d] is not a finite number", key, i);
            fout[i] = (float)d;
        } else {
            int64_t x;
            uint32_t et = ds4_gguf_arr_type(g, kv);
            if (et == DS4_GGUF_F32 || et == DS4_GGUF_F64 || et == DS4_GGUF_STR ||
                ds4_gguf_arr_i64(g, kv, (uint64_t)i, &x) != 0)
                return ds4_err_set(err, DS4_E_MODEL, "metadata key '%s' must be an integer array", key);
            if (x < 0 || x > (1 << 20))
                return ds4_err_set(err, DS4_E_MODEL, "metadata key '%s'[%d] = %lld is out of range",
                                   key, i, (long long)x);
            iout[i] = (int)x;
        }
    }
    return 0;
}

#define K(s) "deepseek4." s

void ds4_hparams_free(ds4_hparams *hp) {
    free(hp->compress_ratio);
    free(hp->swiglu_clamp);
    hp->compress_ratio = NULL;
    hp->swiglu_clamp = NULL;
}

static bool is_pow2(int x) { return x > 0 && (x & (x - 1)) == 0; }

int ds4_model_read_hparams(ds4_hparams *hp, const ds4_gguf *g, ds4_err *err) {
    memset(hp, 0, sizeof *hp);
    int rc;
    const int BIG = 1 << 24;
    ds4_gguf_str arch;
    int64_t akv = ds4_gguf_find_key(g, "general.architecture");
    if (akv >= 0) {
        if (ds4_gguf_get_str(g, "general.architecture", &arch, err) != 0) return DS4_E_MODEL;
        if (arch.len != 9 || memcmp(arch.ptr, "deepseek4", 9) != 0) {
            char esc[300];
            return ds4_err_set(err, DS4_E_MODEL, "general.architecture is '%s', expected 'deepseek4'",
                               ds4_escaped(esc, sizeof esc, arch.ptr, arch.len, 64));
        }
    }
#define DIM(key, lo, hi, field) \
    if ((rc = get_dim(g, K(key), lo, hi, &hp->field, err))) goto fail
    DIM("block_count", 1, 4096, n_layer);
    DIM("embedding_length", 1, BIG, n_embd);
    DIM("vocab_size", 1, BIG, n_vocab);
    DIM("attention.head_count", 1, 65536, n_head);
    DIM("attention.head_count_kv", 1, 65536, n_head_kv);
    DIM("attention.key_length", 1, 65536, head_dim);
    int vlen;
    if ((rc = get_dim(g, K("attention.value_length"), 1, 65536, &vlen, err))) goto fail;
    DIM("rope.dimension_count", 2, 65536, n_rot); /* 0 would be a model without positions: output changed silently */
    DIM("attention.q_lora_rank", 1, BIG, q_lora);
    DIM("attention.output_lora_rank", 1, BIG, o_lora);
    DIM("attention.output_group_count", 1, 65536, o_groups);
    DIM("expert_count", 1, 65536, n_expert);
    DIM("expert_used_count", 1, 65536, n_expert_used);
    DIM("expert_feed_forward_length", 1, BIG, n_ff_exp);
    DIM("expert_shared_count", 0, 16, n_expert_shared);
    DIM("hash_layer_count", 0, 4096, n_hash);
    DIM("attention.sliding_window", 1, BIG, window);
    DIM("attention.indexer.head_count", 1, 65536, idx_heads);
    DIM("attention.indexer.key_length", 1, 65536, idx_dim);
    DIM("attention.indexer.top_k", 1, BIG, idx_topk);
    DIM("hyper_connection.count", 1, 64, n_hc);
    DIM("hyper_connection.sinkhorn_iterations", 1, 1000, sinkhorn_iters);
#undef DIM
    if ((rc = get_float(g, K("hyper_connection.epsilon"), true, 0, &hp->hc_eps, err))) goto fail;
    if ((rc = get_float(g, K("attention.layer_norm_rms_epsilon"), true, 0, &hp->rms_eps, err))) goto fail;
    if ((rc = get_float(g, K("expert_weights_scale"), true, 0, &hp->expert_weights_scale, err))) goto fail;
    if ((rc = get_bool(g, K("expert_weights_norm"), true, true, &hp->expert_weights_norm, err))) goto fail;
    if ((rc = get_float(g, K("rope.freq_base"), true, 0, &hp->rope_base, err))) goto fail;
    if ((rc = get_float(g, K("attention.compress_rope_freq_base"), true, 0, &hp->compress_rope_base, err)))
        goto fail;
    /* finite is not enough: a scale of 3e38 or an epsilon of 0 loads and
     * then turns every logit into NaN (or divides by zero) */
    {
        const hp_range fr[] = {
            {K("hyper_connection.epsilon"), hp->hc_eps, DS4_EPS_RANGE},
            {K("attention.layer_norm_rms_epsilon"), hp->rms_eps, DS4_EPS_RANGE},
            {K("expert_weights_scale"), hp->expert_weights_scale, DS4_EXPERT_SCALE_RANGE},
            {K("rope.freq_base"), hp->rope_base, DS4_ROPE_BASE_RANGE},
            {K("attention.compress_rope_freq_base"), hp->compress_rope_base, DS4_ROPE_BASE_RANGE},
        };
        if ((rc = check_ranges(fr, sizeof fr / sizeof fr[0], err))) goto fail;
    }
    /* the router's scoring: DeepSeek V4's sqrt(softplus) is 4 (1 softmax,
     * 2 sigmoid, 3 softmax_weight, which this engine does not compute);
     * absent in older files: the model's own */
    int64_t gating;
    if ((rc = get_int(g, K("expert_gating_func"), false, 0, INT64_MAX, 4, &gating, err))) goto fail;
    if (gating != 4) {
        rc = ds4_err_set(err, DS4_E_MODEL, "metadata key '%s' is %lld: this engine computes only DeepSeek V4's "
                                           "sqrt(softplus) router scoring (4)",
                         K("expert_gating_func"), (long long)gating);
        goto fail;
    }
    int64_t ctx;
    if ((rc = get_int(g, K("context_length"), false, 0, INT64_MAX, 0, &ctx, err))) goto fail;
    hp->context_length = (uint64_t)ctx;
    int64_t groups, groups_used;
    if ((rc = get_int(g, K("expert_group_count"), false, 0, 0, 0, &groups, err))) goto fail;
    if ((rc = get_int(g, K("expert_group_used_count"), false, 0, 0, 0, &groups_used, err))) goto fail;

    /* RoPE of compressed layers: YaRN or plain, from the file (docs/ORACLE.md §2).
     * rope.scaling.type decides when present; otherwise YaRN iff
     * rope.scaling.factor is present. */
    int64_t tkv = ds4_gguf_find_key(g, K("rope.scaling.type"));
    bool yarn = ds4_gguf_find_key(g, K("rope.scaling.factor")) >= 0;
    if (tkv >= 0) {
        ds4_gguf_str s;
        if ((rc = ds4_gguf_get_str(g, K("rope.scaling.type"), &s, err))) { rc = DS4_E_MODEL; goto fail; }
        if (s.len == 4 && !memcmp(s.ptr, "yarn", 4)) yarn = true;
        else if ((s.len == 4 && !memcmp(s.ptr, "none", 4)) || s.len == 0) yarn = false;
        else {
            char esc[160];
            rc = ds4_err_set(err, DS4_E_MODEL, "metadata key '%s' = '%s' is not supported (yarn or none)",
                             K("rope.scaling.type"), ds4_escaped(esc, sizeof esc, s.ptr, s.len, 32));
            goto fail;
        }
    }
    hp->yarn = yarn;
    if (yarn) {
        int64_t orig;
        if ((rc = get_float(g, K("rope.scaling.factor"), true, 0, &hp->yarn_factor, err))) goto fail;
        if ((rc = get_int(g, K("rope.scaling.original_context_length"), true, 1, INT64_MAX, 0, &orig, err)))
            goto fail;
        hp->yarn_orig_ctx = (uint64_t)orig;
        if ((rc = get_float(g, K("rope.scaling.yarn_beta_fast"), false, 32.0, &hp->yarn_beta_fast, err))) goto fail;
        if ((rc = get_float(g, K("rope.scaling.yarn_beta_slow"), false, 1.0, &hp->yarn_beta_slow, err))) goto fail;
        const hp_range yr[] = {
            {K("rope.scaling.factor"), hp->yarn_factor, DS4_YARN_FACTOR_RANGE},
            {K("rope.scaling.yarn_beta_fast"), hp->yarn_beta_fast, DS4_YARN_BETA_RANGE},
            {K("rope.scaling.yarn_beta_slow"), hp->yarn_beta_slow, DS4_YARN_BETA_RANGE},
        };
        if ((rc = check_ranges(yr, sizeof yr / sizeof yr[0], err))) goto fail;
    }

    hp->compress_ratio = calloc((size_t)hp->n_layer, sizeof(int));
    hp->swiglu_clamp = calloc((size_t)hp->n_layer, sizeof(float));
    if (!hp->compress_ratio || !hp->swiglu_clamp) { rc = ds4_err_set(err, DS4_E_NOMEM, "out of memory"); goto fail; }
    if ((rc = get_layer_array(g, K("attention.compress_ratios"), hp->n_layer, false, hp->compress_ratio, NULL, err)))
        goto fail;
    if ((rc = get_layer_array(g, K("swiglu_clamp_exp"), hp->n_layer, true, NULL, hp->swiglu_clamp, err)))
        goto fail;

    /* Consistency between keys (docs/MODEL.md G.2). */
#define REQUIRE(cond, ...) do { if (!(cond)) { rc = ds4_err_set(err, DS4_E_MODEL, __VA_ARGS__); goto fail; } } while (0)
    REQUIRE(hp->n_head_kv == 1, "attention.head_count_kv = %d, expected 1 (one shared KV head)", hp->n_head_kv);
    REQUIRE(vlen == hp->head_dim, "attention.value_length = %d differs from attention.key_length = %d",
            vlen, hp->head_dim);
    REQUIRE(hp->n_rot % 2 == 0 && hp->n_rot <= hp->head_dim && hp->n_rot <= hp->idx_dim,
            "rope.dimension_count = %d must be even and <= key_length (%d) and indexer.key_length (%d)",
            hp->n_rot, hp->head_dim, hp->idx_dim);
    REQUIRE(hp->n_head % hp->o_groups == 0, "attention.head_count = %d is not a multiple of output_group_count = %d",
            hp->n_head, hp->o_groups);
    REQUIRE(hp->n_expert_used <= hp->n_expert, "expert_used_count = %d exceeds expert_count = %d",
            hp->n_expert_used, hp->n_expert);
    REQUIRE(hp->n_hash <= hp->n_layer, "hash_layer_count = %d exceeds block_count = %d", hp->n_hash, hp->n_layer);
    REQUIRE(hp->n_expert_shared == 1, "expert_shared_count = %d, expected 1", hp->n_expert_shared);
    REQUIRE(is_pow2(hp->idx_dim) && hp->idx_dim % 32 == 0,
            "attention.indexer.key_length = %d must be a power of two >= 32 (Hadamard + FP4 blocks)", hp->idx_dim);
    REQUIRE(hp->rms_eps >= 0 && hp->hc_eps >= 0, "epsilons must be non-negative");
    REQUIRE(hp->rope_base > 1 && hp->compress_rope_base > 1, "RoPE bases must be > 1");
    for (int il = 0; il < hp->n_layer; il++)
        REQUIRE(hp->swiglu_clamp[il] > 0, "swiglu_clamp_exp[%d] = %g must be positive", il,
                (double)hp->swiglu_clamp[il]);
#undef REQUIRE
    return 0;
fail:
    ds4_hparams_free(hp);
    return rc;
}

/* ------------------------------------------------------------ RoPE */

/* Inverse frequencies as PyTorch computes them in float32 (docs/MODEL.md C.4):
 * base^(2i/n) with a float32 exponent, then YaRN's ramp mix in float32;
 * correction range in double (Python math), floored/ceiled. */
static int rope_init(ds4_rope *r, const ds4_hparams *hp, float base, bool yarn, ds4_err *err) {
    int half = hp->n_rot / 2;
    r->base = base;
    r->yarn = yarn;
    r->inv_freq = calloc((size_t)(half > 0 ? half : 1), sizeof(float));
    if (!r->inv_freq) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    double lo = 0, hi = 0;
    if (yarn) {
        double dim = hp->n_rot, L = (double)hp->yarn_orig_ctx;
        double corr_fast = dim * log(L / (hp->yarn_beta_fast * 2 * M_PI)) / (2 * log(base));
        double corr_slow = dim * log(L / (hp->yarn_beta_slow * 2 * M_PI)) / (2 * log(base));
        lo = floor(corr_fast);
        hi = ceil(corr_slow);
        if (lo < 0) lo = 0;
        if (hi > dim - 1) hi = dim - 1;
        if (lo == hi) hi += 0.001;
    }
    for (int i = 0; i < half; i++) {
        float e = (float)(2 * i) / (float)hp->n_rot;
        float pf = powf(base, e);
        float ext = 1.0f / pf;
        if (!yarn) { r->inv_freq[i] = ext; continue; }
        float inter = 1.0f / (hp->yarn_factor * pf);
        float ramp = ((float)i - (float)lo) / (float)(hi - lo);
        if (ramp < 0) ramp = 0;
        if (ramp > 1) ramp = 1;
        float ef = 1.0f - ramp; /* extrapolation factor */
        r->inv_freq[i] = inter * (1.0f - ef) + ext * ef;
    }
    return 0;
}

/* ------------------------------------------------------------ tensors */

static int is_matrix_type(int type) {
    switch (type) {
    case DS4_TYPE_F32: case DS4_TYPE_F16: case DS4_TYPE_BF16: case DS4_TYPE_Q8_0:
    case DS4_TYPE_Q2_K: case DS4_TYPE_Q4_K: case DS4_TYPE_IQ2_XXS:
        return 1;
    default:
        return 0;
    }
}

/* ds4_model_load marks here (per thread) the file's tensors it binds, to
 * refuse a file with tensors the model would silently not use. */
static __thread uint8_t *tl_used;

static const ds4_gguf_tensor *find_tensor(const ds4_gguf *g, const char *name, bool required, ds4_err *err) {
    int64_t i = ds4_gguf_find_tensor(g, name);
    if (i < 0) {
        if (required) ds4_err_set(err, DS4_E_MODEL, "tensor '%s' is missing", name);
        return NULL;
    }
    if (tl_used) tl_used[i] = 1;
    return ds4_gguf_tensor_at(g, i);
}

/* Every tensor of the file is one the model binds (mtp.* excepted: the MTP
 * block is a file of its own, --mtp, and a main file may carry it). A
 * tensor left over means the metadata and the tensors disagree (a block_count
 * smaller than the blocks present) or a foreign tensor: either way the
 * model would not be the file's. */
static int check_all_used(const ds4_gguf *g, const uint8_t *used, const ds4_hparams *hp, ds4_err *err) {
    int64_t n = ds4_gguf_n_tensors(g), extra = 0, first = -1;
    for (int64_t i = 0; i < n; i++) {
        if (used[i] || !strncmp(ds4_gguf_tensor_at(g, i)->name, "mtp.", 4)) continue;
        if (first < 0) first = i;
        extra++;
    }
    if (!extra) return 0;
    return ds4_err_set(err, DS4_E_MODEL,
                       "tensor '%s'%s not used by this model (%d blocks by its metadata): the metadata and the "
                       "tensors disagree", ds4_gguf_tensor_at(g, first)->name,
                       extra > 1 ? " and others are" : " is", hp->n_layer);
}

static void fmt_dims(char *buf, size_t cap, int n, const int64_t *ne) {
    size_t o = 0;
    o += (size_t)snprintf(buf + o, cap - o, "[");
    for (int i = 0; i < n && o < cap; i++)
        o += (size_t)snprintf(buf + o, cap - o, "%s%lld", i ? ", " : "", (long long)ne[i]);
    if (o < cap) snprintf(buf + o, cap - o, "]");
}

static int check_shape(const ds4_gguf_tensor *t, int n_dims, const int64_t *ne, ds4_err *err) {
    bool ok = (int)t->n_dims == n_dims;
    for (int i = 0; ok && i < n_dims; i++) ok = t->ne[i] == ne[i];
    if (ok) return 0;
    char got[96], want[96];
    fmt_dims(got, sizeof got, (int)t->n_dims, t->ne);
    fmt_dims(want, sizeof want, n_dims, ne);
    return ds4_err_set(err, DS4_E_MODEL, "tensor '%s' has shape %s, expected %s", t->name, got, want);
}

/* Binds a matrix / expert stack ne = [n_in, n_out(, n_mat)]. */
static int bind_mat(ds4_weight *w, const ds4_gguf *g, const char *name, int64_t n_in, int64_t n_out,
                    int64_t n_mat, bool required, ds4_err *err) {
    memset(w, 0, sizeof *w);
    const ds4_gguf_tensor *t = find_tensor(g, name, required, err);
    if (!t) return required ? DS4_E_MODEL : 0;
    int64_t ne[3] = {n_in, n_out, n_mat};
    int rc = check_shape(t, n_mat > 1 ? 3 : 2, ne, err);
    if (rc) {
        /* A 2-D matrix with one output row may be written as 1-D. */
        if (!(n_mat == 1 && n_out == 1 && t->n_dims == 1 && t->ne[0] == n_in)) return rc;
        ds4_err_clear(err);
    }
    if (!is_matrix_type((int)t->type))
        return ds4_err_set(err, DS4_E_MODEL,
                           "tensor '%s' has type %s, expected one of F32, F16, BF16, Q8_0, Q2_K, Q4_K, IQ2_XXS",
                           name, ds4_ggml_type_name(t->type));
    if (!ds4_type_row_ok((int)t->type, n_in))
        return ds4_err_set(err, DS4_E_MODEL, "tensor '%s' has type %s, whose block size does not divide its row length %lld",
                           name, ds4_ggml_type_name(t->type), (long long)n_in);
    w->name = t->name;
    w->type = (int)t->type;
    w->n_in = n_in;
    w->n_out = n_out;
    w->n_mat = n_mat;
    w->row_bytes = ds4_type_row_bytes(w->type, n_in);
    w->mat_bytes = w->row_bytes * (size_t)n_out;
    w->data = t->data;
    if ((uint64_t)w->mat_bytes * (uint64_t)n_mat != t->n_bytes)
        return ds4_err_set(err, DS4_E_MODEL, "tensor '%s' holds %llu bytes, expected %llu", name,
                           (unsigned long long)t->n_bytes, (unsigned long long)(w->mat_bytes * (size_t)n_mat));
    return 0;
}

/* Binds a 1-D vector of n values (F32; F16/BF16 accepted) into an owned
 * float array. */
static int bind_vec(float **out, const ds4_gguf *g, const char *name, int64_t n, bool required, ds4_err *err) {
    *out = NULL;
    const ds4_gguf_tensor *t = find_tensor(g, name, required, err);
    if (!t) return required ? DS4_E_MODEL : 0;
    int rc = check_shape(t, 1, &n, err);
    if (rc) return rc;
    if (t->type != DS4_TYPE_F32 && t->type != DS4_TYPE_F16 && t->type != DS4_TYPE_BF16)
        return ds4_err_set(err, DS4_E_MODEL, "tensor '%s' has type %s, expected F32", name,
                           ds4_ggml_type_name(t->type));
    float *v = malloc((size_t)n * sizeof(float));
    if (!v) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    ds4_dequant_row((int)t->type, t->data, v, n);
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(v[i])) {
            free(v);
            return ds4_err_set(err, DS4_E_MODEL, "tensor '%s' has a non-finite value at %lld", name, (long long)i);
        }
    *out = v;
    return 0;
}

static void layer_free(ds4_layer *l) {
    float **v[] = {&l->hc_attn_scale, &l->hc_attn_base, &l->hc_ffn_scale, &l->hc_ffn_base,
                   &l->attn_norm, &l->q_a_norm, &l->kv_norm, &l->sinks, &l->comp_norm,
                   &l->icomp_norm, &l->ffn_norm, &l->exp_bias};
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) { free(*v[i]); *v[i] = NULL; }
    free(l->tid2eid);
    l->tid2eid = NULL;
}

/* Binds layer il from tensors named `pre` + suffix ("blk.N." or "mtp.0."). */
static int bind_layer(ds4_model *m, const ds4_gguf *g, int il, const char *pre, ds4_err *err) {
    const ds4_hparams *hp = &m->hp;
    ds4_layer *l = &m->layers[il];
    const bool mtp = !strncmp(pre, "mtp.", 4);
    char nm[128];
    int rc;
    const int64_t D = hp->n_embd, hc = hp->n_hc, mix = (2 + hp->n_hc) * hp->n_hc;
    const int64_t dh = hp->head_dim, H = hp->n_head, G = hp->o_groups;
#define N(suffix) (snprintf(nm, sizeof nm, "%s" suffix, pre), nm)
#define MAT(field, suffix, nin, nout) \
    if ((rc = bind_mat(&l->field, g, N(suffix), nin, nout, 1, true, err))) return rc
#define VEC(field, suffix, n) \
    if ((rc = bind_vec(&l->field, g, N(suffix), n, true, err))) return rc
    l->ratio = hp->compress_ratio[il];
    l->kind = l->ratio == 0 ? DS4_ATTN_SLIDING : l->ratio == 4 ? DS4_ATTN_CSA : DS4_ATTN_HCA;
    l->hash = il < hp->n_hash;

    MAT(hc_attn_fn, "hc_attn_fn.weight", hc * D, mix);
    VEC(hc_attn_scale, "hc_attn_scale.weight", 3);
    VEC(hc_attn_base, "hc_attn_base.weight", mix);
    VEC(attn_norm, "attn_norm.weight", D);
    MAT(q_a, "attn_q_a.weight", D, hp->q_lora);
    VEC(q_a_norm, "attn_q_a_norm.weight", hp->q_lora);
    MAT(q_b, "attn_q_b.weight", hp->q_lora, H * dh);
    MAT(kv, "attn_kv.weight", D, dh);
    VEC(kv_norm, "attn_kv_a_norm.weight", dh);
    VEC(sinks, "attn_sinks.weight", H);
    MAT(o_a, "attn_output_a.weight", H * dh / G, G * hp->o_lora);
    MAT(o_b, "attn_output_b.weight", G * hp->o_lora, D);
    if (l->kind != DS4_ATTN_SLIDING) {
        int64_t w = l->kind == DS4_ATTN_CSA ? 2 * dh : dh;
        MAT(comp_ape, "attn_compressor_ape.weight", w, l->ratio);
        MAT(comp_kv, "attn_compressor_kv.weight", D, w);
        MAT(comp_gate, "attn_compressor_gate.weight", D, w);
        VEC(comp_norm, "attn_compressor_norm.weight", dh);
    }
    if (l->kind == DS4_ATTN_CSA) {
        int64_t iw = 2 * (int64_t)hp->idx_dim;
        MAT(idx_q_b, "indexer.attn_q_b.weight", hp->q_lora, (int64_t)hp->idx_heads * hp->idx_dim);
        MAT(idx_proj, "indexer.proj.weight", D, hp->idx_heads);
        MAT(icomp_ape, "indexer_compressor_ape.weight", iw, 4);
        MAT(icomp_kv, "indexer_compressor_kv.weight", D, iw);
        MAT(icomp_gate, "indexer_compressor_gate.weight", D, iw);
        VEC(icomp_norm, "indexer_compressor_norm.weight", hp->idx_dim);
    }
    MAT(hc_ffn_fn, "hc_ffn_fn.weight", hc * D, mix);
    VEC(hc_ffn_scale, "hc_ffn_scale.weight", 3);
    VEC(hc_ffn_base, "hc_ffn_base.weight", mix);
    VEC(ffn_norm, "ffn_norm.weight", D);
    MAT(gate_inp, "ffn_gate_inp.weight", D, hp->n_expert);
    /* The selection bias is optional everywhere and used only by non-hash
     * layers (docs/MODEL.md B.3 notes); absent means zeros. */
    if ((rc = bind_vec(&l->exp_bias, g, N("exp_probs_b.bias"), hp->n_expert, mtp, err))) return rc;
    if (!l->exp_bias) {
        l->exp_bias = calloc((size_t)hp->n_expert, sizeof(float));
        if (!l->exp_bias) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    }
    if (l->hash) {
        const ds4_gguf_tensor *t = find_tensor(g, N("ffn_gate_tid2eid.weight"), true, err);
        if (!t) return DS4_E_MODEL;
        int64_t ne[2] = {hp->n_expert_used, hp->n_vocab};
        if ((rc = check_shape(t, 2, ne, err))) return rc;
        if (t->type != DS4_TYPE_I32)
            return ds4_err_set(err, DS4_E_MODEL, "tensor '%s' has type %s, expected I32", nm,
                               ds4_ggml_type_name(t->type));
        const unsigned char *p = t->data;
        int32_t *ids = malloc((size_t)(ne[0] * ne[1]) * sizeof(int32_t));
        if (!ids) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
        memcpy(ids, p, (size_t)(ne[0] * ne[1]) * sizeof(int32_t));
        l->tid2eid = ids;
        for (int64_t i = 0; i < ne[0] * ne[1]; i++) {
            int32_t e = ids[i];
            if (e < 0 || e >= hp->n_expert)
                return ds4_err_set(err, DS4_E_MODEL, "tensor '%s': token %lld slot %lld has expert id %d, expected 0..%d",
                                   nm, (long long)(i / ne[0]), (long long)(i % ne[0]), e, hp->n_expert - 1);
        }
    }
    if ((rc = bind_mat(&l->gate_exps, g, N("ffn_gate_exps.weight"), D, hp->n_ff_exp, hp->n_expert, true, err))) return rc;
    if ((rc = bind_mat(&l->up_exps, g, N("ffn_up_exps.weight"), D, hp->n_ff_exp, hp->n_expert, true, err))) return rc;
    if ((rc = bind_mat(&l->down_exps, g, N("ffn_down_exps.weight"), hp->n_ff_exp, D, hp->n_expert, true, err))) return rc;
    if (l->gate_exps.type != l->up_exps.type)
        return ds4_err_set(err, DS4_E_MODEL, "tensors '%sffn_gate_exps.weight' (%s) and '%sffn_up_exps.weight' (%s) must share a type",
                           pre, ds4_type_name(l->gate_exps.type), pre, ds4_type_name(l->up_exps.type));
    MAT(gate_sh, "ffn_gate_shexp.weight", D, hp->n_ff_exp);
    MAT(up_sh, "ffn_up_shexp.weight", D, hp->n_ff_exp);
    MAT(down_sh, "ffn_down_shexp.weight", hp->n_ff_exp, D);
#undef N
#undef MAT
#undef VEC
    return 0;
}

void ds4_model_free(ds4_model *m) {
    if (m->layers)
        for (int il = 0; il < m->hp.n_layer; il++) layer_free(&m->layers[il]);
    free(m->layers);
    free(m->out_hc_base);
    free(m->out_hc_scale);
    free(m->out_norm);
    free(m->mtp_enorm);
    free(m->mtp_hnorm);
    free(m->rope_main.inv_freq);
    free(m->rope_compress.inv_freq);
    free(m->arch_name);
    free(m->owned_names);
    ds4_hparams_free(&m->hp);
    memset(m, 0, sizeof *m);
}

int ds4_model_load(ds4_model *m, const ds4_gguf *g, ds4_err *err) {
    memset(m, 0, sizeof *m);
    int rc = ds4_model_read_hparams(&m->hp, g, err);
    if (rc) return rc;
    free(tl_used);
    tl_used = calloc((size_t)ds4_gguf_n_tensors(g) + 1, 1);
    if (!tl_used) {
        ds4_model_free(m);
        return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    }
    const ds4_hparams *hp = &m->hp;
    if ((rc = rope_init(&m->rope_main, hp, hp->rope_base, false, err))) goto fail;
    if ((rc = rope_init(&m->rope_compress, hp, hp->compress_rope_base, hp->yarn, err))) goto fail;
    const int64_t D = hp->n_embd;
    if ((rc = bind_mat(&m->tok_embd, g, "token_embd.weight", D, hp->n_vocab, 1, true, err))) goto fail;
    if ((rc = bind_mat(&m->out_hc_fn, g, "output_hc_fn.weight", hp->n_hc * D, hp->n_hc, 1, true, err))) goto fail;
    if ((rc = bind_vec(&m->out_hc_base, g, "output_hc_base.weight", hp->n_hc, true, err))) goto fail;
    if ((rc = bind_vec(&m->out_hc_scale, g, "output_hc_scale.weight", 1, true, err))) goto fail;
    if ((rc = bind_vec(&m->out_norm, g, "output_norm.weight", D, true, err))) goto fail;
    if ((rc = bind_mat(&m->output, g, "output.weight", D, hp->n_vocab, 1, true, err))) goto fail;
    m->layers = calloc((size_t)hp->n_layer, sizeof(ds4_layer));
    if (!m->layers) { rc = ds4_err_set(err, DS4_E_NOMEM, "out of memory"); goto fail; }
    for (int il = 0; il < hp->n_layer; il++) {
        char pre[32];
        snprintf(pre, sizeof pre, "blk.%d.", il);
        if ((rc = bind_layer(m, g, il, pre, err))) goto fail;
    }
    rc = check_all_used(g, tl_used, hp, err);
    free(tl_used);
    tl_used = NULL;
    if (rc) goto fail;
    m->weights_loaded = true;
    return 0;
fail:
    free(tl_used);
    tl_used = NULL;
    ds4_model_free(m);
    return rc;
}

/* ------------------------------------------------------------ MTP */

int ds4_model_load_mtp(ds4_model *m, const ds4_model *main, const ds4_gguf *g, ds4_err *err) {
    memset(m, 0, sizeof *m);
    if (!main->weights_loaded || !main->tok_embd.data)
        return ds4_err_set(err, DS4_E_ARG, "an MTP block needs a loaded main model");
    int rc = 0;
    /* the block's shapes come from the main model; only the architecture
     * name is read: absent, the main model's, or the MTP sidecar's
     * 'deepseek4_mtp_support' (what published validators expect) */
    if (ds4_gguf_find_key(g, "general.architecture") >= 0) {
        ds4_gguf_str arch;
        if (ds4_gguf_get_str(g, "general.architecture", &arch, err) != 0) return DS4_E_MODEL;
        if (!((arch.len == 9 && !memcmp(arch.ptr, "deepseek4", 9)) ||
              (arch.len == 21 && !memcmp(arch.ptr, "deepseek4_mtp_support", 21)))) {
            char esc[300];
            return ds4_err_set(err, DS4_E_MODEL,
                               "MTP file: general.architecture is '%s', expected 'deepseek4_mtp_support' or "
                               "'deepseek4'",
                               ds4_escaped(esc, sizeof esc, arch.ptr, arch.len, 64));
        }
    }
    const ds4_hparams *mh = &main->hp;
    ds4_hparams *hp = &m->hp;
    *hp = *mh;
    hp->n_layer = 1;
    hp->n_hash = 0;
    hp->compress_ratio = calloc(1, sizeof(int));
    hp->swiglu_clamp = malloc(sizeof(float));
    m->rope_main.inv_freq = malloc((size_t)(mh->n_rot / 2 > 0 ? mh->n_rot / 2 : 1) * sizeof(float));
    m->rope_compress.inv_freq = malloc((size_t)(mh->n_rot / 2 > 0 ? mh->n_rot / 2 : 1) * sizeof(float));
    m->layers = calloc(1, sizeof(ds4_layer));
    if (!hp->compress_ratio || !hp->swiglu_clamp || !m->rope_main.inv_freq || !m->rope_compress.inv_freq ||
        !m->layers) {
        rc = ds4_err_set(err, DS4_E_NOMEM, "out of memory");
        goto fail;
    }
    /* the official reference runs the block as layer n_layer (ratio 0, not
     * hashed) with the model's one SwiGLU limit */
    hp->swiglu_clamp[0] = mh->swiglu_clamp[mh->n_layer - 1];
    m->rope_main.base = main->rope_main.base;
    m->rope_main.yarn = main->rope_main.yarn;
    memcpy(m->rope_main.inv_freq, main->rope_main.inv_freq, (size_t)(mh->n_rot / 2) * sizeof(float));
    m->rope_compress.base = main->rope_compress.base;
    m->rope_compress.yarn = main->rope_compress.yarn;
    memcpy(m->rope_compress.inv_freq, main->rope_compress.inv_freq, (size_t)(mh->n_rot / 2) * sizeof(float));
    m->tok_embd = main->tok_embd;
    m->output = main->output;
    const int64_t D = hp->n_embd;
    /* every tensor of the file must be one the block binds (the published
     * file has exactly those 32): a foreign or misnamed tensor means the
     * file is not the MTP block this engine reads */
    free(tl_used);
    tl_used = calloc((size_t)ds4_gguf_n_tensors(g) + 1, 1);
    if (!tl_used) {
        rc = ds4_err_set(err, DS4_E_NOMEM, "out of memory");
        goto fail;
    }
    if ((rc = bind_mat(&m->mtp_e_proj, g, "mtp.0.e_proj.weight", D, D, 1, true, err))) goto fail;
    if ((rc = bind_mat(&m->mtp_h_proj, g, "mtp.0.h_proj.weight", D, D, 1, true, err))) goto fail;
    if ((rc = bind_vec(&m->mtp_enorm, g, "mtp.0.enorm.weight", D, true, err))) goto fail;
    if ((rc = bind_vec(&m->mtp_hnorm, g, "mtp.0.hnorm.weight", D, true, err))) goto fail;
    if ((rc = bind_vec(&m->out_norm, g, "mtp.0.norm.weight", D, true, err))) goto fail;
    if ((rc = bind_mat(&m->out_hc_fn, g, "mtp.0.hc_head_fn.weight", hp->n_hc * D, hp->n_hc, 1, true, err))) goto fail;
    if ((rc = bind_vec(&m->out_hc_base, g, "mtp.0.hc_head_base.weight", hp->n_hc, true, err))) goto fail;
    if ((rc = bind_vec(&m->out_hc_scale, g, "mtp.0.hc_head_scale.weight", 1, true, err))) goto fail;
    if ((rc = bind_layer(m, g, 0, "mtp.0.", err))) goto fail;
    for (int64_t i = 0, n = ds4_gguf_n_tensors(g); i < n; i++)
        if (!tl_used[i]) {
            const char *nm = ds4_gguf_tensor_at(g, i)->name;
            rc = ds4_err_set(err, DS4_E_MODEL,
                             "MTP file: tensor '%s' is not part of the MTP block (%s)", nm,
                             !strncmp(nm, "mtp.", 4) && strncmp(nm, "mtp.0.", 6)
                                 ? "one block, mtp.0, is supported"
                                 : "the block's tensors are the 32 mtp.0.* of FORMATS.md D.3");
            goto fail;
        }
    free(tl_used);
    tl_used = NULL;
    m->weights_loaded = true;
    return 0;
fail:
    free(tl_used);
    tl_used = NULL;
    ds4_model_free(m);
    return rc;
}

/* ------------------------------------------------------------ synthetic */

/* Weight descriptor without data (the backend fills it, synth.h). */
static void synth_mat(ds4_weight *w, const char *name, int type, int64_t n_in, int64_t n_out, int64_t n_mat) {
    memset(w, 0, sizeof *w);
    w->name = name;
    w->type = type;
    w->n_in = n_in;
    w->n_out = n_out;
    w->n_mat = n_mat;
    w->row_bytes = ds4_type_row_bytes(type, n_in);
    w->mat_bytes = w->row_bytes * (size_t)n_out;
}

static float synth_uniform(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (float)(*s >> 40) * (1.0f / 16777216.0f);
}

static float *synth_vec(int64_t n, float base, float spread, uint64_t *s) {
    float *v = malloc((size_t)n * sizeof(float));
    if (v)
        for (int64_t i = 0; i < n; i++) v[i] = base + spread * (2.0f * synth_uniform(s) - 1.0f);
    return v;
}

/* Names of the synthetic model live in m->owned_names (no GGUF owns them). */
#define SYNTH_NAMES 4096
#define SYNTH_NAME_LEN 48
static const char *synth_name(ds4_model *m, int il, const char *suffix) {
    if (m->n_owned_names >= SYNTH_NAMES) return "synthetic";
    char *p = m->owned_names + (size_t)m->n_owned_names++ * SYNTH_NAME_LEN;
    if (il < 0) snprintf(p, SYNTH_NAME_LEN, "%s", suffix);
    else snprintf(p, SYNTH_NAME_LEN, "blk.%d.%s", il, suffix);
    return p;
}

/* The HC and dense attention tensors of one synthetic block (names pre +
 * GGUF suffix, HC matrices of hc_type), vectors drawn from s in a fixed
 * order: HC pre ~ 0.5, post ~ 1, comb near the identity (diagonal bias).
 * DS4_E_NOMEM when a vector cannot be allocated. */
static int synth_block_attn(ds4_model *m, ds4_layer *l, const char *pre, int hc_type, uint64_t *s) {
    const ds4_hparams *hp = &m->hp;
    const int64_t D = hp->n_embd, H = hp->n_head, dh = hp->head_dim;
    const int64_t mix = (2 + hp->n_hc) * hp->n_hc, hcD = hp->n_hc * D;
    char nm[SYNTH_NAME_LEN];
#define SM(field, suffix, type, nin, nout)                                                                    \
    do {                                                                                                     \
        snprintf(nm, sizeof nm, "%s%s", pre, suffix);                                                         \
        synth_mat(&l->field, synth_name(m, -1, nm), type, nin, nout, 1);                                      \
    } while (0)
#define SV(field, n, base, spread) if (!(l->field = synth_vec(n, base, spread, s))) return DS4_E_NOMEM
    SM(hc_attn_fn, "hc_attn_fn.weight", hc_type, hcD, mix);
    SM(hc_ffn_fn, "hc_ffn_fn.weight", hc_type, hcD, mix);
    SV(hc_attn_scale, 3, 0.5f, 0.1f);
    SV(hc_ffn_scale, 3, 0.5f, 0.1f);
    SV(hc_attn_base, mix, 0.0f, 0.2f);
    SV(hc_ffn_base, mix, 0.0f, 0.2f);
    for (int a = 0; a < hp->n_hc; a++) {
        l->hc_attn_base[2 * hp->n_hc + a * hp->n_hc + a] += 3.0f;
        l->hc_ffn_base[2 * hp->n_hc + a * hp->n_hc + a] += 3.0f;
    }
    SV(attn_norm, D, 1.0f, 0.1f);
    SM(q_a, "attn_q_a.weight", DS4_TYPE_Q8_0, D, hp->q_lora);
    SV(q_a_norm, hp->q_lora, 1.0f, 0.1f);
    SM(q_b, "attn_q_b.weight", DS4_TYPE_Q8_0, hp->q_lora, H * dh);
    SM(kv, "attn_kv.weight", DS4_TYPE_Q8_0, D, dh);
    SV(kv_norm, dh, 1.0f, 0.1f);
    SV(sinks, H, 0.0f, 1.0f);
    SM(o_a, "attn_output_a.weight", DS4_TYPE_Q8_0, H * dh / hp->o_groups, hp->o_groups * hp->o_lora);
    SM(o_b, "attn_output_b.weight", DS4_TYPE_Q8_0, hp->o_groups * hp->o_lora, D);
#undef SM
#undef SV
    return 0;
}

int ds4_model_synth(ds4_model *m, const char *recipe, uint64_t seed, ds4_err *err) {
    memset(m, 0, sizeof *m);
    /* "q2" | "q4", optionally ":N": only the first N of the 43 blocks (the
     * same layer pattern and shapes; a benchmark whose weights fit a
     * smaller GPU, e.g. per-kernel timing on an 80 GB card) */
    const char *colon = recipe ? strchr(recipe, ':') : NULL;
    const size_t rl = recipe ? (colon ? (size_t)(colon - recipe) : strlen(recipe)) : 0;
    bool q2 = rl == 2 && !strncmp(recipe, "q2", 2), q4 = rl == 2 && !strncmp(recipe, "q4", 2);
    int n_layer = 43;
    if (q2 || q4) {
        if (colon) {
            char *end = NULL;
            long v = strtol(colon + 1, &end, 10);
            if (colon[1] < '0' || colon[1] > '9' || *end || v < 1 || v > 43) q2 = q4 = false;
            else n_layer = (int)v;
        }
    }
    if (!q2 && !q4)
        return ds4_err_set(err, DS4_E_ARG, "synthetic recipe '%s': expected q2 or q4, optionally :N blocks (1..43)",
                           recipe ? recipe : "");
    ds4_hparams *hp = &m->hp;
    *hp = (ds4_hparams){.n_layer = n_layer, .n_embd = 4096, .n_vocab = 129280, .n_head = 64, .n_head_kv = 1,
                        .head_dim = 512, .n_rot = 64, .q_lora = 1024, .o_lora = 1024, .o_groups = 8,
                        .n_expert = 256, .n_expert_used = 6, .n_ff_exp = 2048, .n_expert_shared = 1,
                        .n_hash = 3, .window = 128, .idx_heads = 64, .idx_dim = 128, .idx_topk = 512,
                        .n_hc = 4, .sinkhorn_iters = 20, .hc_eps = 1e-6f, .rms_eps = 1e-6f,
                        .expert_weights_scale = 1.5f, .expert_weights_norm = true, .rope_base = 10000.0f,
                        .compress_rope_base = 160000.0f, .yarn = true, .yarn_factor = 16.0f,
                        .yarn_beta_fast = 32.0f, .yarn_beta_slow = 1.0f, .yarn_orig_ctx = 65536,
                        .context_length = 1048576};
    if (hp->n_hash > n_layer) hp->n_hash = n_layer;
    int rc = 0;
    uint64_t s = seed ^ 0x5eedull;
    m->owned_names = malloc((size_t)SYNTH_NAMES * SYNTH_NAME_LEN);
    if (!m->owned_names) goto oom;
    hp->compress_ratio = calloc((size_t)hp->n_layer, sizeof(int));
    hp->swiglu_clamp = calloc((size_t)hp->n_layer, sizeof(float));
    m->layers = calloc((size_t)hp->n_layer, sizeof(ds4_layer));
    if (!hp->compress_ratio || !hp->swiglu_clamp || !m->layers) goto oom;
    for (int il = 0; il < hp->n_layer; il++) {
        hp->compress_ratio[il] = il < 2 ? 0 : (il % 2 == 0 ? 4 : 128);
        hp->swiglu_clamp[il] = 10.0f;
    }
    if ((rc = rope_init(&m->rope_main, hp, hp->rope_base, false, err))) goto fail;
    if ((rc = rope_init(&m->rope_compress, hp, hp->compress_rope_base, true, err))) goto fail;
    const int64_t D = hp->n_embd, V = hp->n_vocab, dh = hp->head_dim, E = hp->n_expert;
    const int64_t hcD = hp->n_hc * D, F = hp->n_ff_exp;
    const int gate_t = q2 ? DS4_TYPE_IQ2_XXS : DS4_TYPE_Q4_K, down_t = q2 ? DS4_TYPE_Q2_K : DS4_TYPE_Q4_K;
    synth_mat(&m->tok_embd, synth_name(m, -1, "token_embd.weight"), DS4_TYPE_F16, D, V, 1);
    synth_mat(&m->out_hc_fn, synth_name(m, -1, "output_hc_fn.weight"), DS4_TYPE_F16, hcD, hp->n_hc, 1);
    synth_mat(&m->output, synth_name(m, -1, "output.weight"), DS4_TYPE_Q8_0, D, V, 1);
    if (!(m->out_hc_base = synth_vec(hp->n_hc, 0.0f, 0.2f, &s))) goto oom;
    if (!(m->out_hc_scale = synth_vec(1, 0.5f, 0.0f, &s))) goto oom;
    if (!(m->out_norm = synth_vec(D, 1.0f, 0.1f, &s))) goto oom;
    for (int il = 0; il < hp->n_layer; il++) {
        ds4_layer *l = &m->layers[il];
        l->ratio = hp->compress_ratio[il];
        l->kind = l->ratio == 0 ? DS4_ATTN_SLIDING : l->ratio == 4 ? DS4_ATTN_CSA : DS4_ATTN_HCA;
        l->hash = il < hp->n_hash;
#define SM(field, suffix, type, nin, nout, nmat) synth_mat(&l->field, synth_name(m, il, suffix), type, nin, nout, nmat)
#define SV(field, n, base, spread) if (!(l->field = synth_vec(n, base, spread, &s))) goto oom
        char pre[24];
        snprintf(pre, sizeof pre, "blk.%d.", il);
        if (synth_block_attn(m, l, pre, DS4_TYPE_F16, &s)) goto oom;
        if (l->kind != DS4_ATTN_SLIDING) {
            int64_t w = l->kind == DS4_ATTN_CSA ? 2 * dh : dh;
            SM(comp_ape, "attn_compressor_ape.weight", DS4_TYPE_F16, w, l->ratio, 1);
            SM(comp_kv, "attn_compressor_kv.weight", DS4_TYPE_F16, D, w, 1);
            SM(comp_gate, "attn_compressor_gate.weight", DS4_TYPE_F16, D, w, 1);
            SV(comp_norm, dh, 1.0f, 0.1f);
        }
        if (l->kind == DS4_ATTN_CSA) {
            int64_t iw = 2 * (int64_t)hp->idx_dim;
            SM(idx_q_b, "indexer.attn_q_b.weight", DS4_TYPE_F16, hp->q_lora, (int64_t)hp->idx_heads * hp->idx_dim, 1);
            SM(idx_proj, "indexer.proj.weight", DS4_TYPE_F16, D, hp->idx_heads, 1);
            SM(icomp_ape, "indexer_compressor_ape.weight", DS4_TYPE_F16, iw, 4, 1);
            SM(icomp_kv, "indexer_compressor_kv.weight", DS4_TYPE_F16, D, iw, 1);
            SM(icomp_gate, "indexer_compressor_gate.weight", DS4_TYPE_F16, D, iw, 1);
            SV(icomp_norm, hp->idx_dim, 1.0f, 0.1f);
        }
        SV(ffn_norm, D, 1.0f, 0.1f);
        SM(gate_inp, "ffn_gate_inp.weight", DS4_TYPE_F16, D, E, 1);
        if (l->hash) {
            if (!(l->exp_bias = calloc((size_t)E, sizeof(float)))) goto oom;
            l->tid2eid = malloc((size_t)(V * hp->n_expert_used) * sizeof(int32_t));
            if (!l->tid2eid) goto oom;
            for (int64_t t = 0; t < V; t++) /* distinct experts per token */
                for (int k = 0; k < hp->n_expert_used; k++) {
                    int32_t e;
                    bool dup;
                    do {
                        e = (int32_t)(synth_uniform(&s) * (float)E) % (int32_t)E;
                        dup = false;
                        for (int q = 0; q < k; q++) dup |= l->tid2eid[t * hp->n_expert_used + q] == e;
                    } while (dup);
                    l->tid2eid[t * hp->n_expert_used + k] = e;
                }
        } else {
            SV(exp_bias, E, 0.0f, 0.05f);
        }
        SM(gate_exps, "ffn_gate_exps.weight", gate_t, D, F, E);
        SM(up_exps, "ffn_up_exps.weight", gate_t, D, F, E);
        SM(down_exps, "ffn_down_exps.weight", down_t, F, D, E);
        SM(gate_sh, "ffn_gate_shexp.weight", DS4_TYPE_Q8_0, D, F, 1);
        SM(up_sh, "ffn_up_shexp.weight", DS4_TYPE_Q8_0, D, F, 1);
        SM(down_sh, "ffn_down_shexp.weight", DS4_TYPE_Q8_0, F, D, 1);
#undef SM
#undef SV
    }
    m->weights_loaded = true;
    return 0;
oom:
    rc = ds4_err_set(err, DS4_E_NOMEM, "out of memory building the synthetic model");
fail:
    ds4_model_free(m);
    return rc;
}

/* Standard deviation synthetic weights get: ~1/sqrt(fan-in), the output
 * projections of each sublayer smaller so the residual streams stay bounded
 * over the layers; gates of the compressors small (softmax pooling). */
float ds4_model_synth_std(const ds4_weight *w) {
    const char *n = w->name ? w->name : "";
    float s = 1.0f / sqrtf((float)w->n_in);
    if (strstr(n, "token_embd")) return 1.0f;
    if (strstr(n, "_ape")) return 0.1f;
    if (strstr(n, "output_b") || strstr(n, "down_")) return 0.3f * s;
    return s;
}

/* The MTP block of the published file's recipe (FORMATS.md D.3: Q8_0
 * projections and attention, Q4_K experts, F32 for the rest; the F32 of
 * the HC and router matrices is the file name's suggestion) beside a
 * synthetic main model, data NULL like ds4_model_synth. tok_embd and
 * output are main's descriptors (filled again by the backend's binding). */
int ds4_model_synth_mtp(ds4_model *m, const ds4_model *main, uint64_t seed, ds4_err *err) {
    memset(m, 0, sizeof *m);
    if (!main->weights_loaded) return ds4_err_set(err, DS4_E_ARG, "an MTP block needs a main model");
    const ds4_hparams *mh = &main->hp;
    ds4_hparams *hp = &m->hp;
    *hp = *mh;
    hp->n_layer = 1;
    hp->n_hash = 0;
    int rc = 0;
    uint64_t s = seed ^ 0x3a7bull;
    m->owned_names = malloc((size_t)SYNTH_NAMES * SYNTH_NAME_LEN);
    hp->compress_ratio = calloc(1, sizeof(int));
    hp->swiglu_clamp = malloc(sizeof(float));
    m->layers = calloc(1, sizeof(ds4_layer));
    if (!m->owned_names || !hp->compress_ratio || !hp->swiglu_clamp || !m->layers) goto oom;
    hp->swiglu_clamp[0] = mh->swiglu_clamp[mh->n_layer - 1];
    if ((rc = rope_init(&m->rope_main, hp, hp->rope_base, false, err))) goto fail;
    if ((rc = rope_init(&m->rope_compress, hp, hp->compress_rope_base, hp->yarn, err))) goto fail;
    const int64_t D = hp->n_embd, E = hp->n_expert, F = hp->n_ff_exp, hcD = hp->n_hc * D;
    m->tok_embd = main->tok_embd;
    m->output = main->output;
#define NM(x) synth_name(m, -1, "mtp.0." x)
    synth_mat(&m->mtp_e_proj, NM("e_proj.weight"), DS4_TYPE_Q8_0, D, D, 1);
    synth_mat(&m->mtp_h_proj, NM("h_proj.weight"), DS4_TYPE_Q8_0, D, D, 1);
    synth_mat(&m->out_hc_fn, NM("hc_head_fn.weight"), DS4_TYPE_F32, hcD, hp->n_hc, 1);
    if (!(m->mtp_enorm = synth_vec(D, 1.0f, 0.1f, &s)) || !(m->mtp_hnorm = synth_vec(D, 1.0f, 0.1f, &s)) ||
        !(m->out_norm = synth_vec(D, 1.0f, 0.1f, &s)) || !(m->out_hc_base = synth_vec(hp->n_hc, 0.0f, 0.2f, &s)) ||
        !(m->out_hc_scale = synth_vec(1, 0.5f, 0.0f, &s)))
        goto oom;
    ds4_layer *l = &m->layers[0];
    l->kind = DS4_ATTN_SLIDING;
#define SM(field, x, type, nin, nout, nmat) synth_mat(&l->field, NM(x), type, nin, nout, nmat)
#define SV(field, n, base, spread) if (!(l->field = synth_vec(n, base, spread, &s))) goto oom
    if (synth_block_attn(m, l, "mtp.0.", DS4_TYPE_F32, &s)) goto oom;
    SV(ffn_norm, D, 1.0f, 0.1f);
    SM(gate_inp, "ffn_gate_inp.weight", DS4_TYPE_F32, D, E, 1);
    SV(exp_bias, E, 0.0f, 0.05f);
    SM(gate_exps, "ffn_gate_exps.weight", DS4_TYPE_Q4_K, D, F, E);
    SM(up_exps, "ffn_up_exps.weight", DS4_TYPE_Q4_K, D, F, E);
    SM(down_exps, "ffn_down_exps.weight", DS4_TYPE_Q4_K, F, D, E);
    SM(gate_sh, "ffn_gate_shexp.weight", DS4_TYPE_Q8_0, D, F, 1);
    SM(up_sh, "ffn_up_shexp.weight", DS4_TYPE_Q8_0, D, F, 1);
    SM(down_sh, "ffn_down_shexp.weight", DS4_TYPE_Q8_0, F, D, 1);
#undef SM
#undef SV
#undef NM
    m->weights_loaded = true;
    return 0;
oom:
    rc = ds4_err_set(err, DS4_E_NOMEM, "out of memory building the synthetic MTP block");
fail:
    ds4_model_free(m);
    return rc;
}

/* ------------------------------------------------------------ mirrors */

ds4_model *ds4_model_mirror(const ds4_model *m) {
    ds4_model *mm = malloc(sizeof *mm);
    if (!mm) return NULL;
    *mm = *m;
    mm->layers = malloc((size_t)m->hp.n_layer * sizeof(ds4_layer));
    if (!mm->layers) {
        free(mm);
        return NULL;
    }
    memcpy(mm->layers, m->layers, (size_t)m->hp.n_layer * sizeof(ds4_layer));
    mm->owned_names = NULL; /* names stay owned by the host model */
    mm->arch_name = NULL;
    return mm;
}

void ds4_model_mirror_free(ds4_model *mm) {
    if (!mm) return;
    free(mm->layers);
    free(mm);
}

static void hollow_weight(ds4_weight *w) {
    const char *name = w->name;
    memset(w, 0, sizeof *w);
    w->name = name;
}

ds4_model *ds4_model_part(const ds4_model *m, int l0, int l1, bool first, bool last) {
    ds4_model *mm = ds4_model_mirror(m);
    if (!mm) return NULL;
    if (!first) hollow_weight(&mm->tok_embd);
    if (!last) {
        hollow_weight(&mm->out_hc_fn);
        hollow_weight(&mm->output);
        mm->out_hc_base = mm->out_hc_scale = mm->out_norm = NULL;
    }
    for (int il = 0; il < m->hp.n_layer; il++) {
        if (il >= l0 && il < l1) continue;
        ds4_layer *l = &mm->layers[il];
        ds4_weight *ws[] = {&l->hc_attn_fn, &l->hc_ffn_fn, &l->q_a, &l->q_b, &l->kv, &l->o_a, &l->o_b,
                            &l->comp_ape, &l->comp_kv, &l->comp_gate, &l->idx_q_b, &l->idx_proj, &l->icomp_ape,
                            &l->icomp_kv, &l->icomp_gate, &l->gate_inp, &l->gate_exps, &l->up_exps, &l->down_exps,
                            &l->gate_sh, &l->up_sh, &l->down_sh};
        for (size_t i = 0; i < sizeof ws / sizeof ws[0]; i++) hollow_weight(ws[i]);
        l->hc_attn_scale = l->hc_attn_base = l->hc_ffn_scale = l->hc_ffn_base = NULL;
        l->attn_norm = l->q_a_norm = l->kv_norm = l->sinks = l->comp_norm = l->icomp_norm = l->ffn_norm = NULL;
        l->exp_bias = NULL;
        l->tid2eid = NULL;
    }
    return mm;
}

typedef struct { size_t bytes; } sum_bytes;
static int sum_weight(void *user, ds4_weight *w) {
    ((sum_bytes *)user)->bytes += w->mat_bytes * (size_t)w->n_mat;
    return 0;
}
static int sum_vec(void *user, void **p, size_t bytes) {
    (void)p;
    ((sum_bytes *)user)->bytes += bytes;
    return 0;
}

size_t ds4_model_layer_bytes(const ds4_model *m, int il) {
    ds4_model *mm = ds4_model_part(m, il, il + 1, false, false);
    if (!mm) return 0;
    mm->rope_main.inv_freq = mm->rope_compress.inv_freq = NULL;
    sum_bytes s = {0};
    ds4_model_visit v = {sum_weight, sum_vec, &s};
    ds4_model_visit_all(mm, &v);
    ds4_model_mirror_free(mm);
    return s.bytes;
}

int ds4_model_visit_all(ds4_model *m, const ds4_model_visit *v) {
    const ds4_hparams *hp = &m->hp;
    const size_t F = sizeof(float), mix = (size_t)(2 + hp->n_hc) * hp->n_hc;
    int rc;
#define W(x) if ((x).n_in > 0 && (rc = v->weight(v->user, &(x)))) return rc
#define VEC(p, n) if ((p) && (rc = v->vec(v->user, (void **)&(p), (size_t)(n)))) return rc
    W(m->tok_embd);
    W(m->out_hc_fn);
    W(m->output);
    W(m->mtp_e_proj);
    W(m->mtp_h_proj);
    VEC(m->mtp_enorm, (size_t)hp->n_embd * F);
    VEC(m->mtp_hnorm, (size_t)hp->n_embd * F);
    VEC(m->out_hc_base, (size_t)hp->n_hc * F);
    VEC(m->out_hc_scale, F);
    VEC(m->out_norm, (size_t)hp->n_embd * F);
    VEC(m->rope_main.inv_freq, (size_t)(hp->n_rot / 2 > 0 ? hp->n_rot / 2 : 1) * F);
    VEC(m->rope_compress.inv_freq, (size_t)(hp->n_rot / 2 > 0 ? hp->n_rot / 2 : 1) * F);
    for (int il = 0; il < hp->n_layer; il++) {
        ds4_layer *l = &m->layers[il];
        W(l->hc_attn_fn); W(l->hc_ffn_fn); W(l->q_a); W(l->q_b); W(l->kv); W(l->o_a); W(l->o_b);
        W(l->comp_ape); W(l->comp_kv); W(l->comp_gate);
        W(l->idx_q_b); W(l->idx_proj); W(l->icomp_ape); W(l->icomp_kv); W(l->icomp_gate);
        W(l->gate_inp); W(l->gate_exps); W(l->up_exps); W(l->down_exps); W(l->gate_sh); W(l->up_sh); W(l->down_sh);
        VEC(l->hc_attn_scale, 3 * F);
        VEC(l->hc_attn_base, mix * F);
        VEC(l->hc_ffn_scale, 3 * F);
        VEC(l->hc_ffn_base, mix * F);
        VEC(l->attn_norm, (size_t)hp->n_embd * F);
        VEC(l->q_a_norm, (size_t)hp->q_lora * F);
        VEC(l->kv_norm, (size_t)hp->head_dim * F);
        VEC(l->sinks, (size_t)hp->n_head * F);
        VEC(l->comp_norm, (size_t)hp->head_dim * F);
        VEC(l->icomp_norm, (size_t)hp->idx_dim * F);
        VEC(l->ffn_norm, (size_t)hp->n_embd * F);
        VEC(l->exp_bias, (size_t)hp->n_expert * F);
        VEC(l->tid2eid, (size_t)hp->n_vocab * hp->n_expert_used * sizeof(int32_t));
    }
#undef W
#undef VEC
    return 0;
}
