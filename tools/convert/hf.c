/* hf.c - Hugging Face DeepSeek V4 model directory -> GGUF in the published
 * ds4 layout (docs/MODEL.md §A-B, docs/FORMATS.md §D-E).
 *
 * Three steps, each a function below (the fourth, streaming the tensor
 * data, is stream.c):
 *   1. ds4_conv_read_config: config.json -> ds4_conv_hparams. Accepts
 *      transformers' DeepseekV4Config fields (layer_types, compress_rates,
 *      mlp_layer_types, partial_rotary_factor, rope_parameters flat or nested)
 *      and the official checkpoint's (compress_ratios, num_hash_layers,
 *      qk_rope_head_dim, rope_scaling, quantization_config). Missing or
 *      invalid keys, another architecture or quantization scheme are errors
 *      naming the key.
 *   2. ds4_conv_plan_layout / ds4_conv_plan_mtp: the list of GGUF tensors
 *      (names, dims, output types of the recipe) that hp implies, in the
 *      published files' order: token_embd, output_norm, output, output_hc_*,
 *      then blk.0 .. blk.L-1 (or the mtp.N blocks);
 *      ds4_conv_plan_type_map then applies --type-map rules.
 *   3. ds4_conv_bind_hf_opts: every safetensors tensor is mapped to a planned
 *      tensor (three spellings accepted), its shape and dtype checked; FP8
 *      and packed FP4 weights bind with their ue8m0 ".scale" companion. Any
 *      unmappable tensor (unless skipped and listed), shape mismatch, bad
 *      scale or missing tensor is an error that names it.
 *
 * Element order never changes (docs/MODEL.md B.6): GGUF ne is the reversed
 * PyTorch shape; expert stacks are experts concatenated, expert 0 first;
 * transformers' fused gate_up_proj [E, 2F, D] holds gate rows first.
 */
#include <ctype.h>
#include <fnmatch.h>
#include <jansson.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "convert.h"
#include "model.h"
#include "quant.h"

/* ------------------------------------------------------------ config.json */

void ds4_conv_hparams_free(ds4_conv_hparams *hp) {
    free(hp->ratio);
    hp->ratio = NULL;
}

/* First of the given keys present in root, or NULL. */
static json_t *get_any(json_t *root, const char *const *keys, const char **found) {
    for (; *keys; keys++) {
        json_t *v = json_object_get(root, *keys);
        if (v && !json_is_null(v)) {
            if (found) *found = *keys;
            return v;
        }
    }
    return NULL;
}

/* Integer key (first present of a NULL-terminated alias list) in [lo, hi]. */
static int cfg_int(json_t *root, const char *const *keys, bool required, int64_t def, int64_t lo, int64_t hi,
                   int64_t *out, ds4_err *err) {
    const char *k = keys[0];
    json_t *v = get_any(root, keys, &k);
    if (!v) {
        if (required) return ds4_err_set(err, DS4_E_FORMAT, "config.json: missing key '%s'", keys[0]);
        *out = def;
        return 0;
    }
    /* integers exactly (not through a double: 2^63-1 became 2^63, 2^53+1 became 2^53); a real only
     * when it is a whole number a double holds exactly */
    int64_t x = 0;
    bool ok = false;
    if (json_is_integer(v)) {
        x = (int64_t)json_integer_value(v);
        ok = true;
    } else if (json_is_real(v)) {
        const double d = json_real_value(v);
        ok = d == floor(d) && fabs(d) <= 9007199254740992.0;
        if (ok) x = (int64_t)d;
    }
    if (!ok || x < lo || x > hi)
        return ds4_err_set(err, DS4_E_FORMAT, "config.json: key '%s' must be an integer in [%lld, %lld]", k,
                           (long long)lo, (long long)hi);
    *out = x;
    return 0;
}

static int cfg_num(json_t *root, const char *const *keys, bool required, double def, double *out, ds4_err *err) {
    const char *k = keys[0];
    json_t *v = get_any(root, keys, &k);
    if (!v) {
        if (required) return ds4_err_set(err, DS4_E_FORMAT, "config.json: missing key '%s'", keys[0]);
        *out = def;
        return 0;
    }
    /* the GGUF stores these as F32: a value beyond it would be written as inf */
    if (!json_is_number(v) || !(fabs(json_number_value(v)) <= (double)FLT_MAX))
        return ds4_err_set(err, DS4_E_FORMAT, "config.json: key '%s' must be a finite number (within F32 range)", k);
    *out = json_number_value(v);
    return 0;
}

#define KEYS(...) ((const char *const[]){__VA_ARGS__, NULL})
#define INT_KEY(field, req, def, lo, hi, ...) \
    do { int64_t v_; if ((rc = cfg_int(root, KEYS(__VA_ARGS__), req, def, lo, hi, &v_, err))) goto done; \
         hp->field = (int)v_; } while (0)

/* A boolean/string key that must have one value when present. */
static int cfg_expect(json_t *root, const char *key, const char *want_str, int want_bool, ds4_err *err) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) return 0;
    if (want_str && (!json_is_string(v) || strcmp(json_string_value(v), want_str)))
        return ds4_err_set(err, DS4_E_FORMAT, "config.json: '%s' must be \"%s\" (unsupported otherwise)", key,
                           want_str);
    if (want_bool >= 0 && (!json_is_boolean(v) || json_is_true(v) != want_bool))
        return ds4_err_set(err, DS4_E_FORMAT, "config.json: '%s' must be %s (unsupported otherwise)", key,
                           want_bool ? "true" : "false");
    return 0;
}

/* RoPE of compressed layers from one dictionary: yarn or default. */
static int rope_from_dict(ds4_conv_hparams *hp, json_t *d, const char *where, ds4_err *err) {
    json_t *t = json_object_get(d, "rope_type");
    if (!t) t = json_object_get(d, "type");
    const char *type = json_is_string(t) ? json_string_value(t) : "default";
    int rc;
    double th;
    if ((rc = cfg_num(d, KEYS("rope_theta"), false, hp->compress_rope_base, &th, err))) return rc;
    hp->compress_rope_base = th;
    if (!strcmp(type, "default") || !strcmp(type, "none")) {
        hp->yarn = false;
        return 0;
    }
    if (strcmp(type, "yarn"))
        return ds4_err_set(err, DS4_E_FORMAT, "config.json: %s rope type '%s' is not supported (yarn or default)",
                           where, type);
    hp->yarn = true;
    int64_t orig;
    double af;
    if ((rc = cfg_num(d, KEYS("factor"), true, 0, &hp->yarn_factor, err))) return ds4_err_prefix(err, "%s", where);
    if ((rc = cfg_int(d, KEYS("original_max_position_embeddings"), true, 0, 1, INT64_MAX, &orig, err)))
        return ds4_err_prefix(err, "%s", where);
    hp->yarn_orig_ctx = (uint64_t)orig;
    if ((rc = cfg_num(d, KEYS("beta_fast"), false, 32.0, &hp->yarn_beta_fast, err))) return rc;
    if ((rc = cfg_num(d, KEYS("beta_slow"), false, 1.0, &hp->yarn_beta_slow, err))) return rc;
    if ((rc = cfg_num(d, KEYS("attention_factor"), false, 1.0, &af, err))) return rc;
    if (af != 1.0)
        return ds4_err_set(err, DS4_E_FORMAT,
                           "config.json: %s attention_factor = %g is not supported (DeepSeek V4 applies no YaRN "
                           "magnitude scaling, docs/MODEL.md C.4)", where, af);
    const struct { const char *key; double v, lo, hi; } yr[] = {{"factor", hp->yarn_factor, DS4_YARN_FACTOR_RANGE},
                                                                {"beta_fast", hp->yarn_beta_fast, DS4_YARN_BETA_RANGE},
                                                                {"beta_slow", hp->yarn_beta_slow, DS4_YARN_BETA_RANGE}};
    /* checked as the file stores them: F32 (1.00000001e-6 is 9.99999997e-7 there) */
    for (size_t i = 0; i < sizeof yr / sizeof yr[0]; i++)
        if (!ds4_in_range((double)(float)yr[i].v, yr[i].lo, yr[i].hi))
            return ds4_err_set(err, DS4_E_FORMAT, "config.json: %s %s = %g, expected a value in (%g, %g] (the engine's range)",
                               where, yr[i].key, yr[i].v, yr[i].lo, yr[i].hi);
    return 0;
}

static int read_rope(ds4_conv_hparams *hp, json_t *root, ds4_err *err) {
    json_t *rp = json_object_get(root, "rope_parameters");
    json_t *rsc = json_object_get(root, "rope_scaling");
    if ((rp && !json_is_null(rp) && !json_is_object(rp)) || (rsc && !json_is_null(rsc) && !json_is_object(rsc)))
        return ds4_err_set(err, DS4_E_FORMAT, "config.json: '%s' must be an object (it decides YaRN)",
                           rp && !json_is_null(rp) && !json_is_object(rp) ? "rope_parameters" : "rope_scaling");
    if (json_is_object(rp)) {
        json_t *main = json_object_get(rp, "main"), *comp = json_object_get(rp, "compress");
        if (json_is_object(main) && json_is_object(comp)) {
            json_t *mt = json_object_get(main, "rope_type");
            if (json_is_string(mt) && strcmp(json_string_value(mt), "default"))
                return ds4_err_set(err, DS4_E_FORMAT,
                                   "config.json: rope_parameters.main.rope_type '%s' is not supported (default)",
                                   json_string_value(mt));
            int rc;
            if ((rc = cfg_num(main, KEYS("rope_theta"), false, hp->rope_base, &hp->rope_base, err))) return rc;
            return rope_from_dict(hp, comp, "rope_parameters.compress", err);
        }
        return rope_from_dict(hp, rp, "rope_parameters", err);     /* flat form: applies to compressed layers */
    }
    json_t *rs = json_object_get(root, "rope_scaling");
    if (json_is_object(rs)) return rope_from_dict(hp, rs, "rope_scaling", err);
    hp->yarn = false;
    return 0;
}

static int read_schedule(ds4_conv_hparams *hp, json_t *root, ds4_err *err) {
    hp->ratio = calloc((size_t)hp->n_layer, sizeof(int));
    if (!hp->ratio) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    json_t *lt = json_object_get(root, "layer_types"), *cr = json_object_get(root, "compress_ratios");
    if (json_is_array(lt)) {
        int64_t csa = 4, hca = 128;
        json_t *rates = json_object_get(root, "compress_rates");
        int rc;
        if (json_is_object(rates)) {
            if ((rc = cfg_int(rates, KEYS("compressed_sparse_attention"), false, 4, 1, 1 << 20, &csa, err)) ||
                (rc = cfg_int(rates, KEYS("heavily_compressed_attention"), false, 128, 1, 1 << 20, &hca, err)))
                return ds4_err_prefix(err, "compress_rates");
        }
        if ((rc = cfg_int(root, KEYS("compress_rate_csa"), false, csa, 1, 1 << 20, &csa, err)) ||
            (rc = cfg_int(root, KEYS("compress_rate_hca"), false, hca, 1, 1 << 20, &hca, err)))
            return rc;
        if (csa != 4)
            return ds4_err_set(err, DS4_E_FORMAT,
                               "config.json: the CSA compress rate is %lld; only 4 is supported (the overlapping "
                               "compressor and the indexer are tied to ratio 4, docs/MODEL.md G.1)", (long long)csa);
        if (hca == 4)
            return ds4_err_set(err, DS4_E_FORMAT, "config.json: the HCA compress rate must differ from 4");
        if ((int)json_array_size(lt) < hp->n_layer)
            return ds4_err_set(err, DS4_E_FORMAT, "config.json: layer_types has %zu entries, expected %d",
                               json_array_size(lt), hp->n_layer);
        for (int il = 0; il < hp->n_layer; il++) {
            const char *s = json_string_value(json_array_get(lt, (size_t)il));
            if (!s) return ds4_err_set(err, DS4_E_FORMAT, "config.json: layer_types[%d] is not a string", il);
            if (!strcmp(s, "sliding_attention")) hp->ratio[il] = 0;
            else if (!strcmp(s, "compressed_sparse_attention")) hp->ratio[il] = (int)csa;
            else if (!strcmp(s, "heavily_compressed_attention")) hp->ratio[il] = (int)hca;
            else return ds4_err_set(err, DS4_E_FORMAT, "config.json: layer_types[%d] = '%s' is unknown", il, s);
        }
        return 0;
    }
    if (json_is_array(cr)) {
        if ((int)json_array_size(cr) < hp->n_layer)
            return ds4_err_set(err, DS4_E_FORMAT, "config.json: compress_ratios has %zu entries, expected >= %d",
                               json_array_size(cr), hp->n_layer);
        int n = (int)json_array_size(cr);
        n = n == hp->n_layer + hp->nextn ? n : hp->n_layer;     /* the MTP layers' entries too, when listed */
        int *r = realloc(hp->ratio, (size_t)n * sizeof(int));
        if (!r) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
        hp->ratio = r;
        hp->n_ratio = n;
        for (int il = 0; il < n; il++) {
            json_t *v = json_array_get(cr, (size_t)il);
            if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > (1 << 20))
                return ds4_err_set(err, DS4_E_FORMAT, "config.json: compress_ratios[%d] is not a ratio >= 0", il);
            hp->ratio[il] = (int)json_integer_value(v);
        }
        return 0;
    }
    return ds4_err_set(err, DS4_E_FORMAT,
                       "config.json: missing key 'layer_types' (or the official 'compress_ratios'); transformers' "
                       "default schedule is V4-Pro's, not Flash's (docs/MODEL.md F.11)");
}

static int read_hash_layers(ds4_conv_hparams *hp, json_t *root, ds4_err *err) {
    json_t *mt = json_object_get(root, "mlp_layer_types");
    if (json_is_array(mt)) {
        if ((int)json_array_size(mt) < hp->n_layer)
            return ds4_err_set(err, DS4_E_FORMAT, "config.json: mlp_layer_types has %zu entries, expected %d",
                               json_array_size(mt), hp->n_layer);
        int n = 0;
        for (int il = 0; il < hp->n_layer; il++) {
            const char *s = json_string_value(json_array_get(mt, (size_t)il));
            bool hash = s && !strcmp(s, "hash_moe");
            if (!s || (!hash && strcmp(s, "moe")))
                return ds4_err_set(err, DS4_E_FORMAT, "config.json: mlp_layer_types[%d] must be hash_moe or moe",
                                   il);
            if (hash && n != il)
                return ds4_err_set(err, DS4_E_FORMAT,
                                   "config.json: mlp_layer_types: hash_moe layers must come first (layer %d)", il);
            n += hash;
        }
        hp->n_hash = n;
        return 0;
    }
    int64_t n;
    int rc = cfg_int(root, KEYS("num_hash_layers"), false, 3, 0, hp->n_layer, &n, err);
    if (!rc) hp->n_hash = (int)(n < hp->n_layer ? n : hp->n_layer);
    return rc;
}

/* The architecture (model_type / architectures when present) and the
 * official checkpoint's quantization_config: FP8 E4M3 with ue8m0 scales on
 * 128x128 blocks is the only scheme the FP8 decoding implements. */
static int check_arch(json_t *root, ds4_err *err) {
    json_t *mt = json_object_get(root, "model_type"), *ar = json_object_get(root, "architectures");
    if (mt && (!json_is_string(mt) || strcmp(json_string_value(mt), "deepseek_v4")))
        return ds4_err_set(err, DS4_E_FORMAT, "config.json: model_type '%s' is not DeepSeek V4 (deepseek_v4)",
                           json_is_string(mt) ? json_string_value(mt) : "?");
    if (json_is_array(ar) && json_array_size(ar) > 0) {
        bool ok = false;
        for (size_t i = 0; i < json_array_size(ar); i++) {
            const char *a = json_string_value(json_array_get(ar, i));
            ok |= a && !strcmp(a, "DeepseekV4ForCausalLM");
        }
        if (!ok)
            return ds4_err_set(err, DS4_E_FORMAT, "config.json: architectures %s%s does not name "
                               "DeepseekV4ForCausalLM", json_string_value(json_array_get(ar, 0)) ?
                               json_string_value(json_array_get(ar, 0)) : "?", json_array_size(ar) > 1 ? ", ..." : "");
    }
    json_t *q = json_object_get(root, "quantization_config");
    if (json_is_object(q)) {
        json_t *m = json_object_get(q, "quant_method"), *fmt = json_object_get(q, "fmt"),
               *sf = json_object_get(q, "scale_fmt"), *bs = json_object_get(q, "weight_block_size");
        if ((m && (!json_is_string(m) || strcmp(json_string_value(m), "fp8"))) ||
            (fmt && (!json_is_string(fmt) || strcmp(json_string_value(fmt), "e4m3"))) ||
            (sf && (!json_is_string(sf) || strcmp(json_string_value(sf), "ue8m0"))) ||
            (bs && (!json_is_array(bs) || json_array_size(bs) != 2 ||
                    json_integer_value(json_array_get(bs, 0)) != 128 ||
                    json_integer_value(json_array_get(bs, 1)) != 128)))
            return ds4_err_set(err, DS4_E_FORMAT, "config.json: quantization_config is not the official scheme "
                               "(quant_method fp8, fmt e4m3, scale_fmt ue8m0, weight_block_size [128, 128])");
    }
    json_t *ed = json_object_get(root, "expert_dtype");
    if (ed && (!json_is_string(ed) || (strcmp(json_string_value(ed), "fp4") && strcmp(json_string_value(ed), "fp8") &&
                                       strcmp(json_string_value(ed), "bf16"))))
        return ds4_err_set(err, DS4_E_FORMAT, "config.json: expert_dtype '%s' is not supported (fp4)",
                           json_is_string(ed) ? json_string_value(ed) : "?");
    return 0;
}

int ds4_conv_read_config(ds4_conv_hparams *hp, const char *path, ds4_err *err) {
    memset(hp, 0, sizeof *hp);
    json_t *root = ds4_conv_load_json(path, 0, err);
    if (!root) return err ? err->code : DS4_E_IO;
    int rc = 0;
    if (!json_is_object(root)) {
        rc = ds4_err_set(err, DS4_E_FORMAT, "%s: not a JSON object", path);
        goto done;
    }
    if ((rc = check_arch(root, err))) goto done;
    const int64_t BIG = 1 << 24;
    INT_KEY(n_vocab, true, 0, 1, BIG, "vocab_size");
    INT_KEY(n_embd, true, 0, 1, BIG, "hidden_size");
    INT_KEY(n_layer, true, 0, 1, 4096, "num_hidden_layers");
    INT_KEY(n_head, true, 0, 1, 65536, "num_attention_heads");
    INT_KEY(head_dim, true, 0, 1, 65536, "head_dim");
    INT_KEY(q_lora, true, 0, 1, BIG, "q_lora_rank");
    INT_KEY(o_lora, true, 0, 1, BIG, "o_lora_rank");
    INT_KEY(o_groups, true, 0, 1, 65536, "o_groups");
    INT_KEY(n_expert, true, 0, 1, 65536, "n_routed_experts", "num_local_experts");
    INT_KEY(n_expert_used, true, 0, 1, 65536, "num_experts_per_tok");
    INT_KEY(n_ff, true, 0, 1, BIG, "moe_intermediate_size", "intermediate_size");
    INT_KEY(window, true, 0, 1, BIG, "sliding_window");
    INT_KEY(idx_heads, true, 0, 1, 65536, "index_n_heads");
    INT_KEY(idx_dim, true, 0, 1, 65536, "index_head_dim");
    INT_KEY(idx_topk, true, 0, 1, BIG, "index_topk");
    INT_KEY(n_hc, true, 0, 1, 64, "hc_mult");
    INT_KEY(sinkhorn_iters, true, 0, 1, 1000, "hc_sinkhorn_iters");
    INT_KEY(nextn, false, 0, 0, 64, "num_nextn_predict_layers");
    int kvh, n_shared;
    int64_t v;
    if ((rc = cfg_int(root, KEYS("num_key_value_heads"), false, 1, 1, 1, &v, err))) goto done;
    kvh = (int)v;
    if ((rc = cfg_int(root, KEYS("n_shared_experts"), false, 1, 1, 1, &v, err))) goto done;
    n_shared = (int)v;
    (void)kvh;
    (void)n_shared;
    if ((rc = cfg_int(root, KEYS("max_position_embeddings"), false, 0, 0, INT64_MAX, &v, err))) goto done;
    hp->context_length = (uint64_t)v;
    if ((rc = cfg_num(root, KEYS("hc_eps"), true, 0, &hp->hc_eps, err))) goto done;
    if ((rc = cfg_num(root, KEYS("rms_norm_eps"), true, 0, &hp->rms_eps, err))) goto done;
    if ((rc = cfg_num(root, KEYS("routed_scaling_factor"), true, 0, &hp->routed_scale, err))) goto done;
    if ((rc = cfg_num(root, KEYS("swiglu_limit"), true, 0, &hp->swiglu_limit, err))) goto done;
    if ((rc = cfg_num(root, KEYS("rope_theta"), true, 0, &hp->rope_base, err))) goto done;
    if ((rc = cfg_num(root, KEYS("compress_rope_theta"), true, 0, &hp->compress_rope_base, err))) goto done;
    /* RoPE dims: the official qk_rope_head_dim, else head_dim * partial_rotary_factor */
    if (json_object_get(root, "qk_rope_head_dim")) {
        INT_KEY(n_rot, true, 0, 0, 65536, "qk_rope_head_dim");
    } else {
        double prf;
        if ((rc = cfg_num(root, KEYS("partial_rotary_factor"), true, 0, &prf, err))) goto done;
        if (!(prf >= 0 && prf <= 1)) {
            rc = ds4_err_set(err, DS4_E_FORMAT, "config.json: partial_rotary_factor = %g, expected a value in [0, 1]",
                             prf);
            goto done;
        }
        hp->n_rot = (int)(hp->head_dim * prf);
    }
    if ((rc = cfg_expect(root, "scoring_func", "sqrtsoftplus", -1, err)) ||
        (rc = cfg_expect(root, "hidden_act", "silu", -1, err)) ||
        (rc = cfg_expect(root, "norm_topk_prob", NULL, 1, err)) ||
        (rc = cfg_expect(root, "attention_bias", NULL, 0, err)) ||
        (rc = cfg_expect(root, "mlp_bias", NULL, 0, err)) ||
        (rc = cfg_expect(root, "tie_word_embeddings", NULL, 0, err)))
        goto done;
    if ((rc = read_rope(hp, root, err))) goto done;
    if ((rc = read_schedule(hp, root, err))) goto done;
    if ((rc = read_hash_layers(hp, root, err))) goto done;

#define REQUIRE(cond, ...) do { if (!(cond)) { rc = ds4_err_set(err, DS4_E_FORMAT, __VA_ARGS__); goto done; } } while (0)
    REQUIRE(hp->n_head % hp->o_groups == 0, "config.json: num_attention_heads %d is not a multiple of o_groups %d",
            hp->n_head, hp->o_groups);
    REQUIRE(hp->n_expert_used <= hp->n_expert, "config.json: num_experts_per_tok %d exceeds n_routed_experts %d",
            hp->n_expert_used, hp->n_expert);
    REQUIRE(hp->n_rot % 2 == 0 && hp->n_rot <= hp->head_dim && hp->n_rot <= hp->idx_dim,
            "config.json: RoPE dims %d must be even and <= head_dim (%d) and index_head_dim (%d)", hp->n_rot,
            hp->head_dim, hp->idx_dim);
    /* the engine's ranges (model.h): a value it would refuse at load is refused here, before a long conversion */
    {
        const struct { const char *key; double v, lo, hi; } fr[] = {
            {"hc_eps", hp->hc_eps, DS4_EPS_RANGE},
            {"rms_norm_eps", hp->rms_eps, DS4_EPS_RANGE},
            {"routed_scaling_factor", hp->routed_scale, DS4_EXPERT_SCALE_RANGE},
            {"rope_theta", hp->rope_base, DS4_ROPE_BASE_RANGE},
            {"compress_rope_theta", hp->compress_rope_base, DS4_ROPE_BASE_RANGE},
        };
        /* checked as the file stores them: F32 (1e-50 is 0 there, 1.00000001 is 1) */
        for (size_t i = 0; i < sizeof fr / sizeof fr[0]; i++)
            REQUIRE(ds4_in_range((double)(float)fr[i].v, fr[i].lo, fr[i].hi),
                    "config.json: %s = %.9g, expected a value in (%g, %g] as F32 (the engine's range)", fr[i].key,
                    fr[i].v, fr[i].lo, fr[i].hi);
    }
    REQUIRE(hp->idx_dim >= 32 && (hp->idx_dim & (hp->idx_dim - 1)) == 0,
            "config.json: index_head_dim %d must be a power of two >= 32 (Hadamard + FP4 blocks)", hp->idx_dim);
    REQUIRE((float)hp->swiglu_limit > 0, "config.json: swiglu_limit must be positive (as F32: %g)", hp->swiglu_limit);
#undef REQUIRE
done:
    json_decref(root);
    if (rc) {
        ds4_conv_hparams_free(hp);
        ds4_err_prefix(err, "%s", path);
    }
    return rc;
}

/* ------------------------------------------------------------ plan */

/* Tensor classes of the published recipe (docs/MODEL.md B.5, docs/FORMATS.md D.2):
 * vectors, expert ids, Q8_0 projections (attention, shared experts, head),
 * F16 matrices (embedding, HC, router, compressor, indexer), routed expert
 * gate/up and down stacks, and the MTP file's F32 matrices. */
enum { CLS_VEC, CLS_I32, CLS_PROJ, CLS_F16, CLS_EXP_GU, CLS_EXP_DOWN, CLS_MTP_F32 };

/* The wanted block type, or the best smaller block that divides the row
 * (a tiny model's rows need not be whole 256-blocks): Q8_0, then F16. */
static uint32_t fit_type(uint32_t want, int64_t n_in) {
    if (ds4_type_row_ok((int)want, n_in)) return want;
    return n_in % 32 == 0 ? DS4_GGML_Q8_0 : DS4_GGML_F16;
}

static uint32_t out_type(int cls, ds4_conv_outtype ot, int64_t n_in) {
    if (cls == CLS_VEC) return DS4_GGML_F32;           /* norms, HC scale/base, sinks, router bias */
    if (cls == CLS_I32) return DS4_GGML_I32;           /* tid2eid */
    if (ot == DS4_OUT_F32 || cls == CLS_MTP_F32) return DS4_GGML_F32;
    if (ot == DS4_OUT_F16 || cls == CLS_F16) return DS4_GGML_F16;
    if (cls == CLS_EXP_GU && ot == DS4_OUT_Q2) return fit_type(DS4_GGML_IQ2_XXS, n_in);
    if (cls == CLS_EXP_DOWN && ot == DS4_OUT_Q2) return fit_type(DS4_GGML_Q2_K, n_in);
    if ((cls == CLS_EXP_GU || cls == CLS_EXP_DOWN) && ot == DS4_OUT_Q4) return fit_type(DS4_GGML_Q4_K, n_in);
    /* Q8_0: projections, shared and routed experts, output head; a row that
     * is not a whole number of 32-blocks stays F16 */
    return fit_type(DS4_GGML_Q8_0, n_in);
}

static int plan_add(ds4_conv_plan *p, int *cap, const char *name, int cls, ds4_conv_outtype ot, int n_dims,
                    int64_t n0, int64_t n1, int64_t n2, bool optional, ds4_err *err) {
    if (p->n == *cap) {
        *cap = *cap ? *cap * 2 : 64;
        ds4_conv_tensor *nt = realloc(p->t, (size_t)*cap * sizeof *nt);
        if (!nt) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
        p->t = nt;
    }
    ds4_conv_tensor *t = &p->t[p->n++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->n_dims = n_dims;
    t->ne[0] = n0;
    t->ne[1] = n_dims > 1 ? n1 : 1;
    t->ne[2] = n_dims > 2 ? n2 : 1;
    t->type = out_type(cls, ot, n0);
    t->optional = optional;
    return 0;
}

/* The tensors of one transformer block named PREFIX.* (blk.N or mtp.N), in
 * published order. R: compress ratio; hash: tid2eid routing; mtp: the MTP
 * block's router keeps its bias (required there) and its matrices use the
 * MTP file's types. */
static int plan_block(ds4_conv_plan *p, int *cap, const char *pre, const ds4_conv_hparams *hp, int R, bool hash,
                      bool mtp, ds4_conv_outtype ot, ds4_err *err) {
    const int64_t D = hp->n_embd, V = hp->n_vocab, hc = hp->n_hc, mix = (2 + hc) * hc, dh = hp->head_dim;
    const int64_t H = hp->n_head, G = hp->o_groups, E = hp->n_expert, F = hp->n_ff;
    const int F16M = mtp ? CLS_MTP_F32 : CLS_F16;
    int rc = 0;
    char nm[64];
#define ADD(cls, nd, a, b, c, opt, suffix) \
    do { snprintf(nm, sizeof nm, "%s.%s", pre, suffix); \
         if ((rc = plan_add(p, cap, nm, cls, ot, nd, a, b, c, opt, err))) return rc; } while (0)
    ADD(F16M, 2, hc * D, mix, 1, false, "hc_attn_fn.weight");
    ADD(CLS_VEC, 1, 3, 1, 1, false, "hc_attn_scale.weight");
    ADD(CLS_VEC, 1, mix, 1, 1, false, "hc_attn_base.weight");
    ADD(CLS_VEC, 1, D, 1, 1, false, "attn_norm.weight");
    ADD(CLS_PROJ, 2, D, hp->q_lora, 1, false, "attn_q_a.weight");
    ADD(CLS_VEC, 1, hp->q_lora, 1, 1, false, "attn_q_a_norm.weight");
    ADD(CLS_PROJ, 2, hp->q_lora, H * dh, 1, false, "attn_q_b.weight");
    ADD(CLS_PROJ, 2, D, dh, 1, false, "attn_kv.weight");
    ADD(CLS_VEC, 1, dh, 1, 1, false, "attn_kv_a_norm.weight");
    ADD(CLS_VEC, 1, H, 1, 1, false, "attn_sinks.weight");
    ADD(CLS_PROJ, 2, H * dh / G, G * hp->o_lora, 1, false, "attn_output_a.weight");
    ADD(CLS_PROJ, 2, G * hp->o_lora, D, 1, false, "attn_output_b.weight");
    if (R != 0) {
        const int64_t w = (R == 4 ? 2 : 1) * dh;
        ADD(CLS_F16, 2, w, R, 1, false, "attn_compressor_ape.weight");
        ADD(CLS_F16, 2, D, w, 1, false, "attn_compressor_kv.weight");
        ADD(CLS_F16, 2, D, w, 1, false, "attn_compressor_gate.weight");
        ADD(CLS_VEC, 1, dh, 1, 1, false, "attn_compressor_norm.weight");
    }
    if (R == 4) {
        const int64_t iw = 2 * (int64_t)hp->idx_dim;
        ADD(CLS_F16, 2, hp->q_lora, (int64_t)hp->idx_heads * hp->idx_dim, 1, false, "indexer.attn_q_b.weight");
        ADD(CLS_F16, 2, D, hp->idx_heads, 1, false, "indexer.proj.weight");
        ADD(CLS_F16, 2, iw, 4, 1, false, "indexer_compressor_ape.weight");
        ADD(CLS_F16, 2, D, iw, 1, false, "indexer_compressor_kv.weight");
        ADD(CLS_F16, 2, D, iw, 1, false, "indexer_compressor_gate.weight");
        ADD(CLS_VEC, 1, hp->idx_dim, 1, 1, false, "indexer_compressor_norm.weight");
    }
    ADD(F16M, 2, hc * D, mix, 1, false, "hc_ffn_fn.weight");
    ADD(CLS_VEC, 1, 3, 1, 1, false, "hc_ffn_scale.weight");
    ADD(CLS_VEC, 1, mix, 1, 1, false, "hc_ffn_base.weight");
    ADD(CLS_VEC, 1, D, 1, 1, false, "ffn_norm.weight");
    ADD(F16M, 2, D, E, 1, false, "ffn_gate_inp.weight");
    /* the selection bias: official hash layers have none; optional in the
     * main model, required in the MTP block (docs/FORMATS.md D.3) */
    ADD(CLS_VEC, 1, E, 1, 1, !mtp, "exp_probs_b.bias");
    if (hash) {
        ADD(CLS_I32, 2, hp->n_expert_used, V, 1, false, "ffn_gate_tid2eid.weight");
        p->t[p->n - 1].rb = (double)E;              /* ids must lie in 0..E-1 */
    }
    /* the MTP file has Q4_K experts whatever the main recipe */
    const ds4_conv_outtype eot = mtp && ot != DS4_OUT_F32 ? DS4_OUT_Q4 : ot;
    if ((rc = plan_add(p, cap, (snprintf(nm, sizeof nm, "%s.ffn_gate_exps.weight", pre), nm), CLS_EXP_GU, eot, 3, D,
                       F, E, false, err)) ||
        (rc = plan_add(p, cap, (snprintf(nm, sizeof nm, "%s.ffn_up_exps.weight", pre), nm), CLS_EXP_GU, eot, 3, D, F,
                       E, false, err)) ||
        (rc = plan_add(p, cap, (snprintf(nm, sizeof nm, "%s.ffn_down_exps.weight", pre), nm), CLS_EXP_DOWN, eot, 3,
                       F, D, E, false, err)))
        return rc;
    ADD(CLS_PROJ, 2, D, F, 1, false, "ffn_gate_shexp.weight");
    ADD(CLS_PROJ, 2, D, F, 1, false, "ffn_up_shexp.weight");
    ADD(CLS_PROJ, 2, F, D, 1, false, "ffn_down_shexp.weight");
#undef ADD
    return 0;
}

int ds4_conv_plan_layout(ds4_conv_plan *p, const ds4_conv_hparams *hp, ds4_conv_outtype ot, ds4_err *err) {
    memset(p, 0, sizeof *p);
    int cap = 0, rc = 0;
    const int64_t D = hp->n_embd, V = hp->n_vocab, hc = hp->n_hc;
    char pre[32];
    /* the global tensors first, in the published files' order (docs/FORMATS.md D.2, shared/tools/synth_gguf.py):
     * embedding, output norm, head, then the head's HC parameters; then the blocks */
    if ((rc = plan_add(p, &cap, "token_embd.weight", CLS_F16, ot, 2, D, V, 1, false, err)) ||
        (rc = plan_add(p, &cap, "output_norm.weight", CLS_VEC, ot, 1, D, 1, 1, false, err)) ||
        (rc = plan_add(p, &cap, "output.weight", CLS_PROJ, ot, 2, D, V, 1, false, err)) ||
        (rc = plan_add(p, &cap, "output_hc_base.weight", CLS_VEC, ot, 1, hc, 1, 1, false, err)) ||
        (rc = plan_add(p, &cap, "output_hc_fn.weight", CLS_F16, ot, 2, hc * D, hc, 1, false, err)) ||
        (rc = plan_add(p, &cap, "output_hc_scale.weight", CLS_VEC, ot, 1, 1, 1, 1, false, err)))
        goto fail;
    for (int il = 0; il < hp->n_layer; il++) {
        snprintf(pre, sizeof pre, "blk.%d", il);
        if ((rc = plan_block(p, &cap, pre, hp, hp->ratio[il], il < hp->n_hash, false, ot, err))) goto fail;
    }
    return 0;
fail:
    ds4_conv_plan_free(p);
    return rc;
}

int ds4_conv_plan_mtp(ds4_conv_plan *p, const ds4_conv_hparams *hp, ds4_conv_outtype ot, ds4_err *err) {
    memset(p, 0, sizeof *p);
    if (hp->nextn < 1)
        return ds4_err_set(err, DS4_E_MODEL, "--mtp-out: config.json has num_nextn_predict_layers = 0 (no MTP block)");
    if (hp->nextn > 1) /* the engine loads one block (model.c ds4_model_load_mtp): a file it would refuse */
        return ds4_err_set(err, DS4_E_MODEL,
                           "--mtp-out: config.json has num_nextn_predict_layers = %d; the engine runs one MTP block",
                           hp->nextn);
    int cap = 0, rc = 0;
    const int64_t D = hp->n_embd, hc = hp->n_hc;
    char pre[32], nm[64];
    for (int k = 0; k < hp->nextn; k++) {
        snprintf(pre, sizeof pre, "mtp.%d", k);
#define MADD(cls, nd, a, b, suffix) \
    do { snprintf(nm, sizeof nm, "%s.%s", pre, suffix); \
         if ((rc = plan_add(p, &cap, nm, cls, ot, nd, a, b, 1, false, err))) goto fail; } while (0)
        MADD(CLS_VEC, 1, hc, 1, "hc_head_base.weight");
        MADD(CLS_MTP_F32, 2, hc * D, hc, "hc_head_fn.weight");
        MADD(CLS_VEC, 1, 1, 1, "hc_head_scale.weight");
        MADD(CLS_PROJ, 2, D, D, "e_proj.weight");
        MADD(CLS_PROJ, 2, D, D, "h_proj.weight");
        MADD(CLS_VEC, 1, D, 1, "enorm.weight");
        MADD(CLS_VEC, 1, D, 1, "hnorm.weight");
        MADD(CLS_VEC, 1, D, 1, "norm.weight");
#undef MADD
        if ((rc = plan_block(p, &cap, pre, hp, 0, false, true, ot, err))) goto fail;
    }
    return 0;
fail:
    ds4_conv_plan_free(p);
    return rc;
}

/* Types a --type-map may name (ggml spellings, case-insensitive). */
static const struct { const char *name; uint32_t type; } map_types[] = {
    {"f32", DS4_GGML_F32},   {"f16", DS4_GGML_F16},   {"bf16", DS4_GGML_BF16},       {"q8_0", DS4_GGML_Q8_0},
    {"q4_k", DS4_GGML_Q4_K}, {"q2_k", DS4_GGML_Q2_K}, {"iq2_xxs", DS4_GGML_IQ2_XXS},
};

/* One PATTERN=TYPE (or "PATTERN TYPE") rule, applied to every match in the
 * n plans. */
static int apply_rule(ds4_conv_plan *const *plans, int n_plans, const char *rule, const char *where, ds4_err *err) {
    char pat[256], ty[32];
    const char *sep = strpbrk(rule, "= \t");
    if (!sep || sep == rule || (size_t)(sep - rule) >= sizeof pat)
        return ds4_err_set(err, DS4_E_ARG, "--type-map %s: '%s' is not PATTERN=TYPE", where, rule);
    snprintf(pat, sizeof pat, "%.*s", (int)(sep - rule), rule);
    while (*sep == '=' || *sep == ' ' || *sep == '\t') sep++;
    size_t n = strlen(sep);
    while (n && isspace((unsigned char)sep[n - 1])) n--;
    if (n == 0 || n >= sizeof ty) return ds4_err_set(err, DS4_E_ARG, "--type-map %s: '%s' has no type", where, rule);
    for (size_t i = 0; i < n; i++) ty[i] = (char)tolower((unsigned char)sep[i]);
    ty[n] = 0;
    uint32_t type = UINT32_MAX;
    for (size_t i = 0; i < sizeof map_types / sizeof map_types[0]; i++)
        if (!strcmp(ty, map_types[i].name)) type = map_types[i].type;
    if (type == UINT32_MAX)
        return ds4_err_set(err, DS4_E_ARG, "--type-map %s: unknown type '%s' (f32, f16, bf16, q8_0, q4_K, q2_K, "
                           "iq2_xxs)", where, ty);
    int hits = 0;
    for (int k = 0; k < n_plans; k++) {
        for (int i = 0; i < plans[k]->n; i++) {
            ds4_conv_tensor *t = &plans[k]->t[i];
            if (fnmatch(pat, t->name, 0)) continue;
            if (t->n_dims == 1 || t->type == DS4_GGML_I32)
                return ds4_err_set(err, DS4_E_ARG, "--type-map %s: '%s' matches %s, which stays %s (vectors and "
                                   "expert ids are not converted)", where, pat, t->name, ds4_ggml_type_name(t->type));
            if (type != DS4_GGML_F32 && !ds4_type_row_ok((int)type, t->ne[0]))
                return ds4_err_set(err, DS4_E_ARG, "--type-map %s: '%s' matches %s, whose rows of %lld values are "
                                   "not whole %s blocks", where, pat, t->name, (long long)t->ne[0],
                                   ds4_ggml_type_name(type));
            t->type = type;
            hits++;
        }
    }
    if (!hits)
        return ds4_err_set(err, DS4_E_ARG, "--type-map %s: pattern '%s' matches no tensor%s", where, pat,
                           n_plans < 2 && !strncmp(pat, "mtp", 3) ? " (the mtp.N.* tensors need --mtp-out)" : "");
    return 0;
}

int ds4_conv_plan_type_map(ds4_conv_plan *const *plans, int n_plans, const char *spec, ds4_err *err) {
    FILE *f = strchr(spec, '=') ? NULL : fopen(spec, "r");
    char line[512], where[64];
    int rc = 0;
    if (f) {                                /* a rules file: one rule per line */
        struct stat sb;
        if (fstat(fileno(f), &sb) != 0 || !S_ISREG(sb.st_mode)) { /* a directory opens but reads nothing */
            fclose(f);
            return ds4_err_set(err, DS4_E_ARG, "--type-map: '%s' is not a regular file", spec);
        }
        for (int ln = 1; !rc && fgets(line, sizeof line, f); ln++) {
            char *s = line;
            char *hash = strchr(s, '#');
            if (hash) *hash = 0;
            while (isspace((unsigned char)*s)) s++;
            if (!*s) continue;
            snprintf(where, sizeof where, "%.40s line %d", spec, ln);
            rc = apply_rule(plans, n_plans, s, where, err);
        }
        fclose(f);
        return rc;
    }
    if (!strchr(spec, '='))
        return ds4_err_set(err, DS4_E_ARG, "--type-map: '%s' is neither a readable file nor PATTERN=TYPE rules", spec);
    const char *s = spec;
    for (int k = 1; *s && !rc; k++) {
        const char *e = strchr(s, ',');
        size_t n = e ? (size_t)(e - s) : strlen(s);
        if (n >= sizeof line) return ds4_err_set(err, DS4_E_ARG, "--type-map: rule %d is too long", k);
        snprintf(line, sizeof line, "%.*s", (int)n, s);
        snprintf(where, sizeof where, "rule %d", k);
        rc = apply_rule(plans, n_plans, line, where, err);
        s += n + (e ? 1 : 0);
    }
    return rc;
}

void ds4_conv_plan_free(ds4_conv_plan *p) {
    for (int i = 0; i < p->n; i++) {
        free(p->t[i].experts);
        free(p->t[i].expert_scales);
    }
    free(p->t);
    memset(p, 0, sizeof *p);
}

ds4_conv_tensor *ds4_conv_plan_find(ds4_conv_plan *p, const char *name) {
    for (int i = 0; i < p->n; i++)
        if (!strcmp(p->t[i].name, name)) return &p->t[i];
    return NULL;
}

/* ------------------------------------------------------------ name mapping */

/* GGUF name (after "blk.N.") <- accepted source suffixes (after "layers.N."):
 * official / save_pretrained spelling first, then transformers' module
 * names (docs/MODEL.md B.3, docs/ORACLE.md §4). */
static const struct { const char *gguf; const char *src[4]; } layer_map[] = {
    {"hc_attn_fn.weight", {"hc_attn_fn", "attn_hc.fn"}},
    {"hc_attn_scale.weight", {"hc_attn_scale", "attn_hc.scale"}},
    {"hc_attn_base.weight", {"hc_attn_base", "attn_hc.base"}},
    {"attn_norm.weight", {"attn_norm.weight", "input_layernorm.weight"}},
    {"attn_q_a.weight", {"attn.wq_a.weight", "self_attn.q_a_proj.weight"}},
    {"attn_q_a_norm.weight", {"attn.q_norm.weight", "self_attn.q_a_norm.weight"}},
    {"attn_q_b.weight", {"attn.wq_b.weight", "self_attn.q_b_proj.weight"}},
    {"attn_kv.weight", {"attn.wkv.weight", "self_attn.kv_proj.weight"}},
    {"attn_kv_a_norm.weight", {"attn.kv_norm.weight", "attn.norm.weight", "self_attn.kv_norm.weight"}},
    {"attn_sinks.weight", {"attn.attn_sink", "self_attn.sinks"}},
    {"attn_output_a.weight", {"attn.wo_a.weight", "self_attn.o_a_proj.weight"}},
    {"attn_output_b.weight", {"attn.wo_b.weight", "self_attn.o_b_proj.weight"}},
    {"attn_compressor_ape.weight", {"attn.compressor.ape", "self_attn.compressor.position_bias"}},
    {"attn_compressor_kv.weight", {"attn.compressor.wkv.weight", "self_attn.compressor.kv_proj.weight"}},
    {"attn_compressor_gate.weight", {"attn.compressor.wgate.weight", "self_attn.compressor.gate_proj.weight"}},
    {"attn_compressor_norm.weight", {"attn.compressor.norm.weight", "self_attn.compressor.kv_norm.weight"}},
    {"indexer.attn_q_b.weight", {"attn.indexer.wq_b.weight", "self_attn.compressor.indexer.q_b_proj.weight"}},
    {"indexer.proj.weight",
     {"attn.indexer.weights_proj.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight",
      "self_attn.compressor.indexer.weights_proj.weight"}},
    {"indexer_compressor_ape.weight", {"attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias"}},
    {"indexer_compressor_kv.weight",
     {"attn.indexer.compressor.wkv.weight", "self_attn.compressor.indexer.kv_proj.weight"}},
    {"indexer_compressor_gate.weight",
     {"attn.indexer.compressor.wgate.weight", "self_attn.compressor.indexer.gate_proj.weight"}},
    {"indexer_compressor_norm.weight",
     {"attn.indexer.compressor.norm.weight", "self_attn.compressor.indexer.kv_norm.weight"}},
    {"hc_ffn_fn.weight", {"hc_ffn_fn", "ffn_hc.fn"}},
    {"hc_ffn_scale.weight", {"hc_ffn_scale", "ffn_hc.scale"}},
    {"hc_ffn_base.weight", {"hc_ffn_base", "ffn_hc.base"}},
    {"ffn_norm.weight", {"ffn_norm.weight", "post_attention_layernorm.weight"}},
    {"ffn_gate_inp.weight", {"ffn.gate.weight", "mlp.gate.weight"}},
    {"exp_probs_b.bias", {"ffn.gate.bias", "mlp.gate.e_score_correction_bias"}},
    {"ffn_gate_tid2eid.weight", {"ffn.gate.tid2eid", "mlp.gate.tid2eid"}},
    {"ffn_gate_shexp.weight", {"ffn.shared_experts.w1.weight", "mlp.shared_experts.gate_proj.weight"}},
    {"ffn_up_shexp.weight", {"ffn.shared_experts.w3.weight", "mlp.shared_experts.up_proj.weight"}},
    {"ffn_down_shexp.weight", {"ffn.shared_experts.w2.weight", "mlp.shared_experts.down_proj.weight"}},
    {"ffn_down_exps.weight", {"mlp.experts.down_proj"}},           /* transformers' stacked [E, D, F] */
};

static const struct { const char *gguf; const char *src[3]; } global_map[] = {
    {"token_embd.weight", {"embed.weight", "embed_tokens.weight"}},
    {"output.weight", {"head.weight", "lm_head.weight"}},
    {"output_norm.weight", {"norm.weight"}},
    {"output_hc_fn.weight", {"hc_head_fn", "hc_head.hc_fn"}},
    {"output_hc_base.weight", {"hc_head_base", "hc_head.hc_base"}},
    {"output_hc_scale.weight", {"hc_head_scale", "hc_head.hc_scale"}},
};

/* Per-expert projections: source word -> GGUF stack. */
static const struct { const char *src; const char *gguf; } expert_map[] = {
    {"w1", "ffn_gate_exps.weight"}, {"w3", "ffn_up_exps.weight"}, {"w2", "ffn_down_exps.weight"},
    {"gate_proj", "ffn_gate_exps.weight"}, {"up_proj", "ffn_up_exps.weight"},
    {"down_proj", "ffn_down_exps.weight"},
};

static void fmt_shape(char *buf, size_t cap, int n, const int64_t *s) {
    size_t o = (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < n && o < cap; i++) o += (size_t)snprintf(buf + o, cap - o, "%s%lld", i ? ", " : "", (long long)s[i]);
    if (o < cap) snprintf(buf + o, cap - o, "]");
}

/* Checks that source tensor s has the given row-major shape. */
static int check_src_shape(const ds4_st_tensor *s, const char *gguf, int n, const int64_t *want, ds4_err *err) {
    bool ok = s->n_dims == n;
    for (int i = 0; ok && i < n; i++) ok = s->shape[i] == want[i];
    if (ok) return 0;
    char got[96], exp[96];
    fmt_shape(got, sizeof got, s->n_dims, s->shape);
    fmt_shape(exp, sizeof exp, n, want);
    return ds4_err_set(err, DS4_E_MODEL, "tensor '%s' (-> %s) has shape %s, expected %s", s->name, gguf, got, exp);
}

/* Source encodings a float tensor may have: plain floats, or the official
 * checkpoint's FP8 E4M3 (128x128 tiles of ue8m0 scales) and packed FP4 E2M1
 * (two codes per I8/U8 byte, one ue8m0 scale per 32 values of a row),
 * docs/FORMATS.md E.3. Dispatch is on the dtype of each shard header. */
static bool is_fp8(const ds4_st_tensor *s) { return s->dtype == DS4_ST_F8_E4M3; }
static bool is_fp4(const ds4_st_tensor *s) { return s->dtype == DS4_ST_I8 || s->dtype == DS4_ST_U8; }

static int check_src_dtype(const ds4_st_tensor *s, const ds4_conv_tensor *t, ds4_err *err) {
    if (t->type == DS4_GGML_I32) {
        if (s->dtype == DS4_ST_I64 || s->dtype == DS4_ST_I32) return 0;
        return ds4_err_set(err, DS4_E_MODEL, "tensor '%s' has dtype %s, expected I64 or I32 (expert ids)", s->name,
                           ds4_st_dtype_name(s->dtype));
    }
    if (s->dtype == DS4_ST_F32 || s->dtype == DS4_ST_F16 || s->dtype == DS4_ST_BF16 || is_fp8(s) || is_fp4(s))
        return 0;
    return ds4_err_set(err, DS4_E_MODEL,
                       "tensor '%s' has unsupported dtype %s (F32, BF16, F16, or F8_E4M3 / I8 (FP4) with a "
                       "F8_E8M0 .scale expected)", s->name, ds4_st_dtype_name(s->dtype));
}

/* The ue8m0 companion "X.scale" of an FP8/FP4 weight "X.weight" (or "X"),
 * checked against the logical shape [rows, cols] of the weight. */
static int find_scale(const ds4_st *st, const ds4_st_tensor *s, int64_t rows, int64_t cols,
                      const ds4_st_tensor **out, ds4_err *err) {
    char nm[512];
    size_t n = strlen(s->name);
    if (n > 7 && !strcmp(s->name + n - 7, ".weight")) n -= 7;
    snprintf(nm, sizeof nm, "%.*s.scale", (int)n, s->name);
    const ds4_st_tensor *sc = ds4_st_find(st, nm);
    const char *what = is_fp8(s) ? "FP8 E4M3" : "FP4 E2M1 (packed I8)";
    if (!sc)
        return ds4_err_set(err, DS4_E_MODEL, "tensor '%s' is %s but its scale tensor '%s' is missing", s->name, what,
                           nm);
    if (sc->dtype != DS4_ST_F8_E8M0)
        return ds4_err_set(err, DS4_E_MODEL, "scale tensor '%s' has dtype %s, expected F8_E8M0 (ue8m0)", nm,
                           ds4_st_dtype_name(sc->dtype));
    int64_t want[2];
    if (is_fp8(s)) {
        want[0] = (rows + 127) / 128;     /* one scale per 128x128 tile, partial tiles rounded up */
        want[1] = (cols + 127) / 128;
    } else {
        if (cols % 32)
            return ds4_err_set(err, DS4_E_MODEL, "tensor '%s': FP4 rows of %lld values are not whole 32-blocks",
                               s->name, (long long)cols);
        want[0] = rows;                   /* one scale per 32 values of a row */
        want[1] = cols / 32;
    }
    if (sc->n_dims != 2 || sc->shape[0] != want[0] || sc->shape[1] != want[1]) {
        char got[96], exp[96];
        fmt_shape(got, sizeof got, sc->n_dims, sc->shape);
        fmt_shape(exp, sizeof exp, 2, want);
        return ds4_err_set(err, DS4_E_MODEL, "scale tensor '%s' has shape %s, expected %s for %s weight '%s'", nm, got,
                           exp, what, s->name);
    }
    *out = sc;
    return 0;
}

/* Checks s against the row-major logical shape want[0..n) of its planned
 * tensor (FP4 stores half the columns) and finds the scale of an FP8/FP4 s. */
static int check_src(const ds4_st *st, const ds4_st_tensor *s, const ds4_conv_tensor *t, int n, const int64_t *want,
                     const ds4_st_tensor **scale, ds4_err *err) {
    int rc = check_src_dtype(s, t, err);
    if (rc) return rc;
    *scale = NULL;
    if (!is_fp8(s) && !is_fp4(s)) return check_src_shape(s, t->name, n, want, err);
    if (n != 2)
        return ds4_err_set(err, DS4_E_MODEL, "tensor '%s' (-> %s) is %s: only 2-D FP8/FP4 matrices are supported",
                           s->name, t->name, ds4_st_dtype_name(s->dtype));
    int64_t stored[2] = {want[0], is_fp4(s) ? want[1] / 2 : want[1]};
    if (is_fp4(s) && want[1] % 2)
        return ds4_err_set(err, DS4_E_MODEL, "tensor '%s' (-> %s): FP4 rows need an even length", s->name, t->name);
    if ((rc = check_src_shape(s, t->name, 2, stored, err))) return rc;
    return find_scale(st, s, want[0], want[1], scale, err);
}

/* Binds s as the whole of planned tensor t (kind PLAIN or FUSED_*). */
static int bind_whole(const ds4_st *st, ds4_conv_tensor *t, const ds4_st_tensor *s, ds4_conv_src_kind kind,
                      ds4_err *err) {
    if (!t) return ds4_err_set(err, DS4_E_INTERNAL, "tensor '%s': no planned target", s->name);
    if (t->src != DS4_SRC_NONE)
        return ds4_err_set(err, DS4_E_MODEL, "tensor '%s' maps to '%s', which another tensor%s%s already provides",
                           s->name, t->name, t->st ? " " : "", t->st ? t->st->name : "");
    int64_t want[3];
    int n = t->n_dims;
    for (int i = 0; i < n; i++) want[i] = t->ne[n - 1 - i];
    if (kind == DS4_SRC_FUSED_LO || kind == DS4_SRC_FUSED_HI) {
        want[1] *= 2;   /* [E, 2F, D] */
        if (is_fp8(s) || is_fp4(s))
            return ds4_err_set(err, DS4_E_MODEL, "tensor '%s': fused FP8/FP4 expert stacks are not supported", s->name);
    }
    const ds4_st_tensor *scale;
    int rc = check_src(st, s, t, n, want, &scale, err);
    if (rc) return rc;
    t->src = kind;
    t->st = s;
    t->scale = scale;
    return 0;
}

/* Binds s as matrix e of the expert stack t. */
static int bind_expert(const ds4_st *st, ds4_conv_tensor *t, const ds4_st_tensor *s, int64_t e, ds4_err *err) {
    if (t->src != DS4_SRC_NONE && t->src != DS4_SRC_EXPERTS)
        return ds4_err_set(err, DS4_E_MODEL, "tensor '%s' maps to expert %lld of '%s', which '%s' already provides",
                           s->name, (long long)e, t->name, t->st ? t->st->name : "?");
    if (e < 0 || e >= t->ne[2])
        return ds4_err_set(err, DS4_E_MODEL, "tensor '%s': expert %lld out of range (n_routed_experts = %lld)",
                           s->name, (long long)e, (long long)t->ne[2]);
    int64_t want[2] = {t->ne[1], t->ne[0]};
    const ds4_st_tensor *scale;
    int rc = check_src(st, s, t, 2, want, &scale, err);
    if (rc) return rc;
    if (!t->experts) {
        t->experts = calloc((size_t)t->ne[2], sizeof *t->experts);
        t->expert_scales = calloc((size_t)t->ne[2], sizeof *t->expert_scales);
        if (!t->experts || !t->expert_scales) return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    }
    if (t->experts[e])
        return ds4_err_set(err, DS4_E_MODEL, "tensors '%s' and '%s' are both expert %lld of '%s'", t->experts[e]->name,
                           s->name, (long long)e, t->name);
    t->src = DS4_SRC_EXPERTS;
    t->experts[e] = s;
    t->expert_scales[e] = scale;
    return 0;
}

static int no_target(const ds4_st_tensor *s, const char *gguf, int il, const ds4_conv_hparams *hp, ds4_err *err) {
    if (il < 0) return ds4_err_set(err, DS4_E_MODEL, "tensor '%s' maps to '%s', which this model does not have", s->name, gguf);
    return ds4_err_set(err, DS4_E_MODEL,
                       "tensor '%s' maps to 'blk.%d.%s', which layer %d (compress ratio %d, %s MoE) does not have",
                       s->name, il, gguf, il, hp->ratio[il], il < hp->n_hash ? "hash" : "top-k");
}

/* What became of one source tensor. */
enum { MAP_BOUND, MAP_SKIP_MTP, MAP_SKIP_MAIN, MAP_SKIP_BUFFER, MAP_SCALE, MAP_UNKNOWN };

/* MTP-only names (after "mtp.N.") -> GGUF suffix (docs/FORMATS.md D.3). */
static const struct { const char *src; const char *gguf; } mtp_map[] = {
    {"e_proj.weight", "e_proj.weight"}, {"h_proj.weight", "h_proj.weight"}, {"enorm.weight", "enorm.weight"},
    {"hnorm.weight", "hnorm.weight"},   {"norm.weight", "norm.weight"},     {"hc_head_fn", "hc_head_fn.weight"},
    {"hc_head_base", "hc_head_base.weight"}, {"hc_head_scale", "hc_head_scale.weight"},
};

/* "PREFIX<N>." at the start of s with N a plain decimal (digits only, no
 * leading zero, at most 9 digits: no sign, blank or overflow makes an alias
 * of another index): 1 with *idx = N and *len = the bytes through the dot. */
static int name_index(const char *s, const char *prefix, int *idx, int *len) {
    const size_t pl = strlen(prefix);
    if (strncmp(s, prefix, pl)) return 0;
    const char *d = s + pl;
    int n = 0;
    long long v = 0;
    while (d[n] >= '0' && d[n] <= '9' && n < 10) v = v * 10 + (d[n] - '0'), n++;
    if (n == 0 || n > 9 || (n > 1 && d[0] == '0') || d[n] != '.') return 0;
    *idx = (int)v;
    *len = (int)(pl + (size_t)n + 1);
    return 1;
}

/* Binds a per-layer suffix (after "layers.N." or "mtp.N.") to PRE.<gguf>. */
static int map_block(ds4_conv_plan *p, const ds4_conv_hparams *hp, const ds4_st *st, const ds4_st_tensor *s,
                     const char *pre, int il, const char *suf, bool mtp, int *what, ds4_err *err) {
    char g[96];
    if (mtp)
        for (size_t i = 0; i < sizeof mtp_map / sizeof mtp_map[0]; i++)
            if (!strcmp(suf, mtp_map[i].src)) {
                snprintf(g, sizeof g, "%s.%s", pre, mtp_map[i].gguf);
                return bind_whole(st, ds4_conv_plan_find(p, g), s, DS4_SRC_PLAIN, err);
            }
    /* per-expert matrices: {ffn,mlp}.experts.E.{w1,w2,w3,gate_proj,up_proj,down_proj}.weight */
    int e, eoff = 0;
    char word[16] = "";
    if (name_index(suf, "ffn.experts.", &e, &eoff) || name_index(suf, "mlp.experts.", &e, &eoff)) {
        const char *w = suf + eoff;
        size_t wl = 0;
        while (wl < 15 && ((w[wl] >= 'a' && w[wl] <= 'z') || (w[wl] >= '0' && w[wl] <= '9') || w[wl] == '_')) wl++;
        if (wl > 0 && !strcmp(w + wl, ".weight")) memcpy(word, w, wl), word[wl] = 0;
        else word[0] = 0, e = -1;
    } else {
        e = -1;
    }
    if (e >= 0) {
        for (size_t i = 0; i < sizeof expert_map / sizeof expert_map[0]; i++)
            if (!strcmp(word, expert_map[i].src)) {
                snprintf(g, sizeof g, "%s.%s", pre, expert_map[i].gguf);
                ds4_conv_tensor *t = ds4_conv_plan_find(p, g);
                if (!t) return no_target(s, expert_map[i].gguf, il, hp, err);
                return bind_expert(st, t, s, e, err);
            }
    }
    if (!strcmp(suf, "mlp.experts.gate_up_proj")) {     /* transformers' fused [E, 2F, D], gate first */
        snprintf(g, sizeof g, "%s.ffn_gate_exps.weight", pre);
        int rc = bind_whole(st, ds4_conv_plan_find(p, g), s, DS4_SRC_FUSED_LO, err);
        if (rc) return rc;
        snprintf(g, sizeof g, "%s.ffn_up_exps.weight", pre);
        return bind_whole(st, ds4_conv_plan_find(p, g), s, DS4_SRC_FUSED_HI, err);
    }
    for (size_t i = 0; i < sizeof layer_map / sizeof layer_map[0]; i++)
        for (int j = 0; j < 4 && layer_map[i].src[j]; j++)
            if (!strcmp(suf, layer_map[i].src[j])) {
                snprintf(g, sizeof g, "%s.%s", pre, layer_map[i].gguf);
                ds4_conv_tensor *t = ds4_conv_plan_find(p, g);
                if (!t) {
                    if (mtp)
                        return ds4_err_set(err, DS4_E_MODEL, "tensor '%s' maps to '%s', which the MTP block does "
                                           "not have", s->name, g);
                    return no_target(s, layer_map[i].gguf, il, hp, err);
                }
                return bind_whole(st, t, s, DS4_SRC_PLAIN, err);
            }
    *what = MAP_UNKNOWN;
    return 0;
}

/* Maps one source tensor name onto the plan; *what says what became of it.
 * Skipped without binding: the MTP block (main plan) or everything else
 * (MTP plan), RoPE buffers, and ue8m0 ".scale" companions, which bind with
 * their weight (a scale whose weight is missing or not FP8/FP4 is an error). */
static int map_one(ds4_conv_plan *p, const ds4_conv_hparams *hp, const ds4_st *st, const ds4_st_tensor *s, bool mtp,
                   int *what, ds4_err *err) {
    const char *n = s->name;
    *what = MAP_BOUND;
    if (!strncmp(n, "model.", 6)) n += 6;
    size_t len = strlen(s->name);
    if (len > 6 && !strcmp(s->name + len - 6, ".scale")) {
        char w[512];
        snprintf(w, sizeof w, "%.*s.weight", (int)(len - 6), s->name);
        const ds4_st_tensor *wt = ds4_st_find(st, w);
        if (!wt) {
            snprintf(w, sizeof w, "%.*s", (int)(len - 6), s->name);
            wt = ds4_st_find(st, w);
        }
        if (wt && (is_fp8(wt) || is_fp4(wt))) {   /* bound (dtype and shape checked) with its weight */
            *what = MAP_SCALE;
            return 0;
        }
        if (s->dtype == DS4_ST_F8_E8M0 && !wt)
            return ds4_err_set(err, DS4_E_MODEL, "scale tensor '%s' has no weight tensor '%.*s.weight'", s->name,
                               (int)(len - 6), s->name);
        if (s->dtype == DS4_ST_F8_E8M0)
            return ds4_err_set(err, DS4_E_MODEL, "scale tensor '%s' belongs to '%s', whose dtype %s is neither FP8 "
                               "E4M3 nor packed FP4", s->name, wt->name, ds4_st_dtype_name(wt->dtype));
        /* else an ordinary tensor whose name ends in .scale (transformers' attn_hc.scale) */
    }
    if (strstr(n, "inv_freq")) {
        *what = MAP_SKIP_BUFFER;
        return 0;
    }
    int il, off = 0;
    char pre[32];
    if (!strncmp(n, "mtp.", 4)) {
        if (!mtp) {
            *what = MAP_SKIP_MTP;
            return 0;
        }
        if (!name_index(n, "mtp.", &il, &off) || il >= hp->nextn) {
            *what = MAP_UNKNOWN;
            return 0;
        }
        snprintf(pre, sizeof pre, "mtp.%d", il);
        return map_block(p, hp, st, s, pre, il, n + off, true, what, err);
    }
    if (mtp) {
        *what = MAP_SKIP_MAIN;
        return 0;
    }
    for (size_t i = 0; i < sizeof global_map / sizeof global_map[0]; i++)
        for (int j = 0; j < 3 && global_map[i].src[j]; j++)
            if (!strcmp(n, global_map[i].src[j])) {
                ds4_conv_tensor *t = ds4_conv_plan_find(p, global_map[i].gguf);
                if (!t) return no_target(s, global_map[i].gguf, -1, hp, err);
                return bind_whole(st, t, s, DS4_SRC_PLAIN, err);
            }
    if (name_index(n, "layers.", &il, &off)) {
        if (il >= hp->n_layer)
            return ds4_err_set(err, DS4_E_MODEL, "tensor '%s': layer %d out of range (num_hidden_layers = %d)",
                               s->name, il, hp->n_layer);
        snprintf(pre, sizeof pre, "blk.%d", il);
        return map_block(p, hp, st, s, pre, il, n + off, false, what, err);
    }
    *what = MAP_UNKNOWN;
    return 0;
}

int ds4_conv_bind_hf_opts(ds4_conv_plan *p, const ds4_conv_hparams *hp, const ds4_st *st,
                          const ds4_conv_bind_opts *opt, ds4_err *err) {
    int n_mtp = 0, n_unknown = 0;
    for (int i = 0; i < st->n; i++) {
        int what, rc = map_one(p, hp, st, &st->t[i], opt->mtp, &what, err);
        if (rc) return rc;
        n_mtp += what == MAP_SKIP_MTP;
        if (what == MAP_UNKNOWN) {
            if (!opt->skip_unknown)
                return ds4_err_set(err, DS4_E_MODEL, "cannot map tensor '%s' to a GGUF tensor (--skip-unknown lists "
                                   "and skips such tensors)", st->t[i].name);
            fprintf(stderr, "ds4-convert: skipping '%s' (%s, %.1f MiB): the engine has no use for it\n",
                    st->t[i].name, ds4_st_dtype_name(st->t[i].dtype), (double)st->t[i].n_bytes / (1 << 20));
            n_unknown++;
        }
    }
    if (n_mtp && !(opt && opt->mtp_elsewhere))
        fprintf(stderr, "ds4-convert: skipped %d mtp.* tensors of the main file (--mtp-out FILE writes them)\n", n_mtp);
    if (n_unknown) fprintf(stderr, "ds4-convert: skipped %d unknown tensors\n", n_unknown);
    /* every non-optional tensor, and every expert of a per-expert stack */
    char list[400] = "";
    int n_missing = 0;
    for (int i = 0; i < p->n; i++) {
        ds4_conv_tensor *t = &p->t[i];
        char item[96] = "";
        if (t->src == DS4_SRC_NONE && !t->optional) snprintf(item, sizeof item, "%s", t->name);
        if (t->src == DS4_SRC_EXPERTS)
            for (int64_t e = 0; e < t->ne[2]; e++)
                if (!t->experts[e]) {
                    snprintf(item, sizeof item, "%s (expert %lld)", t->name, (long long)e);
                    break;
                }
        if (!item[0]) continue;
        if (n_missing++ < 4)
            snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", n_missing > 1 ? ", " : "", item);
    }
    if (n_missing)
        return ds4_err_set(err, DS4_E_MODEL, "%d GGUF tensor%s without a source: %s%s", n_missing,
                           n_missing > 1 ? "s" : "", list, n_missing > 4 ? ", ..." : "");
    return 0;
}

/* ------------------------------------------------------------ metadata */

int ds4_conv_add_metadata(ds4_gguf_writer *w, const ds4_conv_hparams *hp, const char *name,
                          ds4_conv_outtype ot, ds4_err *err) {
#define K(s) "deepseek4." s
#define U32(k, v) ds4_gguf_writer_add_u32(w, k, (uint32_t)(v))
#define F32(k, v) ds4_gguf_writer_add_f32(w, k, (float)(v))
    ds4_gguf_writer_add_str(w, "general.architecture", "deepseek4", 9);
    ds4_gguf_writer_add_str(w, "general.type", "model", 5);
    ds4_gguf_writer_add_str(w, "general.name", name, strlen(name));
    U32("general.alignment", 32);                                        /* as the published files state it */
    /* llama.cpp ftype ids: ALL_F32 0, MOSTLY_F16 1, MOSTLY_Q8_0 7, MOSTLY_Q4_K_M 15, MOSTLY_IQ2_XXS 19 (the
     * published files' values are not known, docs/FORMATS.md D.4) */
    U32("general.file_type", ot == DS4_OUT_F32 ? 0 : ot == DS4_OUT_F16 ? 1 : ot == DS4_OUT_Q4 ? 15 : ot == DS4_OUT_Q2 ? 19 : 7);
    U32("general.quantization_version", 2);
    if (hp->context_length) {
        if (hp->context_length <= UINT32_MAX) U32(K("context_length"), hp->context_length);
        else ds4_gguf_writer_add_u64(w, K("context_length"), hp->context_length);
    }
    U32(K("block_count"), hp->n_layer);
    U32(K("embedding_length"), hp->n_embd);
    U32(K("vocab_size"), hp->n_vocab);
    U32(K("attention.head_count"), hp->n_head);
    U32(K("attention.head_count_kv"), 1);
    U32(K("attention.key_length"), hp->head_dim);
    U32(K("attention.value_length"), hp->head_dim);
    U32(K("rope.dimension_count"), hp->n_rot);
    U32(K("attention.q_lora_rank"), hp->q_lora);
    U32(K("attention.output_lora_rank"), hp->o_lora);
    U32(K("attention.output_group_count"), hp->o_groups);
    U32(K("expert_count"), hp->n_expert);
    U32(K("expert_used_count"), hp->n_expert_used);
    U32(K("expert_feed_forward_length"), hp->n_ff);
    U32(K("expert_shared_count"), 1);
    U32(K("hash_layer_count"), hp->n_hash);
    U32(K("attention.sliding_window"), hp->window);
    U32(K("attention.indexer.head_count"), hp->idx_heads);
    U32(K("attention.indexer.key_length"), hp->idx_dim);
    U32(K("attention.indexer.top_k"), hp->idx_topk);
    U32(K("hyper_connection.count"), hp->n_hc);
    U32(K("hyper_connection.sinkhorn_iterations"), hp->sinkhorn_iters);
    F32(K("hyper_connection.epsilon"), hp->hc_eps);
    F32(K("attention.layer_norm_rms_epsilon"), hp->rms_eps);
    F32(K("rope.freq_base"), hp->rope_base);
    F32(K("attention.compress_rope_freq_base"), hp->compress_rope_base);
    if (hp->yarn) {
        ds4_gguf_writer_add_str(w, K("rope.scaling.type"), "yarn", 4);
        F32(K("rope.scaling.factor"), hp->yarn_factor);
        if (hp->yarn_orig_ctx <= UINT32_MAX) U32(K("rope.scaling.original_context_length"), hp->yarn_orig_ctx);
        else ds4_gguf_writer_add_u64(w, K("rope.scaling.original_context_length"), hp->yarn_orig_ctx);
        F32(K("rope.scaling.yarn_beta_fast"), hp->yarn_beta_fast);
        F32(K("rope.scaling.yarn_beta_slow"), hp->yarn_beta_slow);
    } else {
        ds4_gguf_writer_add_str(w, K("rope.scaling.type"), "none", 4);   /* plain RoPE on compressed layers */
    }
    F32(K("expert_weights_scale"), hp->routed_scale);
    ds4_gguf_writer_add_bool(w, K("expert_weights_norm"), true);
    U32(K("expert_gating_func"), 4);                                      /* sqrtsoftplus */
    if (hp->nextn) U32(K("nextn_predict_layers"), hp->nextn);
    /* per-layer arrays cover the MTP layers too (n_layer + nextn entries, as the published files have them,
     * docs/FORMATS.md D.4): the official compress_ratios is copied whole; an MTP layer it does not list is
     * sliding (0, D.3) */
    const int n_known = hp->n_ratio > hp->n_layer ? hp->n_ratio : hp->n_layer;
    const int n_arr = hp->n_layer + hp->nextn > n_known ? hp->n_layer + hp->nextn : n_known;
    int32_t *ratios = malloc((size_t)n_arr * sizeof *ratios);
    float *clamp = malloc((size_t)n_arr * sizeof *clamp);
    if (!ratios || !clamp) {
        free(ratios);
        free(clamp);
        return ds4_err_set(err, DS4_E_NOMEM, "out of memory");
    }
    for (int il = 0; il < n_arr; il++) ratios[il] = il < n_known ? hp->ratio[il] : 0;
    for (int il = 0; il < n_arr; il++) clamp[il] = (float)hp->swiglu_limit;
    ds4_gguf_writer_add_arr(w, K("attention.compress_ratios"), DS4_GGUF_I32, ratios, (uint64_t)n_arr);
    int rc = ds4_gguf_writer_add_arr(w, K("swiglu_clamp_exp"), DS4_GGUF_F32, clamp, (uint64_t)n_arr);
    free(ratios);
    free(clamp);
    /* an earlier add failure is kept by the writer and reported by its write call */
    if (rc) return ds4_err_set(err, rc, "adding metadata failed (duplicate key?)");
    return 0;
#undef K
#undef U32
#undef F32
}

