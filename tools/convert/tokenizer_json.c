/* tokenizer_json.c - Hugging Face tokenizer.json -> GGUF tokenizer keys.
 *
 * Owns the reading of a BPE tokenizer.json (jansson) into the arrays the
 * GGUF stores, and the writing of the tokenizer.ggml.* keys as the
 * published DeepSeek V4 Flash files carry them (docs/FORMATS.md D.4, docs/MODEL.md
 * A.3). Invariants of a loaded ds4_tokjson: every id 0..n_tokens-1 has a
 * string (gaps are "[PADn]"), no string is NULL, ids of the vocabulary and
 * of added_tokens agree where both name the same id.
 */
#include "convert.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "util/file.h"

#define BOS_STR "<\xef\xbd\x9c" "begin\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>"
#define EOS_STR "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>"
#define PAD_STR "<\xef\xbd\x9c\xe2\x96\x81pad\xe2\x96\x81\xef\xbd\x9c>"

/* V4 tokens absent from the V3 tokenizer.json, with their V4 ids (docs/TEXT.md
 * A.8; the ids are those reported for V4, the engine finds them by string). */
static const struct {
    const char *str;
    int id;
} k_v4_added[] = {
    {"<think>", 128821},
    {"</think>", 128822},
    {"\xef\xbd\x9c" "DSML\xef\xbd\x9c", 128825},
};

enum { TT_NORMAL = 1, TT_CONTROL = 3, TT_USER = 4, TT_UNUSED = 5 };

void ds4_tokjson_free(ds4_tokjson *tj) {
    if (!tj) return;
    for (int i = 0; tj->tokens && i < tj->n_tokens; i++) free(tj->tokens[i]);
    for (int i = 0; tj->merges && i < tj->n_merges; i++) free(tj->merges[i]);
    free(tj->tokens);
    free(tj->token_lens);
    free(tj->token_type);
    free(tj->merges);
    free(tj->merge_lens);
    memset(tj, 0, sizeof *tj);
}

static char *dup_bytes(const char *s, size_t n) {
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = '\0';
    }
    return d;
}

/* Sets token id to s (type tt); the slot must be empty or hold the same
 * string. */
static int set_token(ds4_tokjson *tj, int id, const char *s, size_t n, int tt, ds4_err *err) {
    if (tj->tokens[id]) {
        if (tj->token_lens[id] != n || memcmp(tj->tokens[id], s, n) != 0)
            return ds4_err_set(err, DS4_E_FORMAT,
                               "tokenizer.json: id %d is both \"%s\" and \"%.*s\"", id,
                               tj->tokens[id], (int)(n > 80 ? 80 : n), s);
        tj->token_type[id] = tt;
        return 0;
    }
    if (!(tj->tokens[id] = dup_bytes(s, n)))
        return ds4_err_set(err, DS4_E_NOMEM, "tokenizer.json: out of memory");
    tj->token_lens[id] = n;
    tj->token_type[id] = tt;
    return 0;
}

/* Id of string s among the loaded tokens, or -1 (linear: used a few times). */
static int find_token(const ds4_tokjson *tj, const char *s) {
    size_t n = strlen(s);
    for (int i = 0; i < tj->n_tokens; i++)
        if (tj->tokens[i] && tj->token_lens[i] == n && memcmp(tj->tokens[i], s, n) == 0) return i;
    return -1;
}

/* A token that reads like a marker ("<｜...｜>", "<|...|>"): control. */
static int looks_special(const char *s, size_t n) {
    if (n >= 4 && s[0] == '<' && s[1] == '|' && s[n - 2] == '|' && s[n - 1] == '>') return 1;
    return n >= 8 && memcmp(s, "<\xef\xbd\x9c", 4) == 0 && memcmp(s + n - 4, "\xef\xbd\x9c>", 4) == 0;
}

static int load_merges(ds4_tokjson *tj, json_t *merges, ds4_err *err) {
    size_t n = json_array_size(merges);
    if (n > INT32_MAX) return ds4_err_set(err, DS4_E_FORMAT, "tokenizer.json: too many merges");
    tj->merges = calloc(n ? n : 1, sizeof(char *));
    tj->merge_lens = calloc(n ? n : 1, sizeof(size_t));
    if (!tj->merges || !tj->merge_lens)
        return ds4_err_set(err, DS4_E_NOMEM, "tokenizer.json: out of memory");
    tj->n_merges = (int)n;
    for (size_t i = 0; i < n; i++) {
        json_t *m = json_array_get(merges, i);
        if (json_is_string(m)) {
            tj->merges[i] = dup_bytes(json_string_value(m), json_string_length(m));
            tj->merge_lens[i] = json_string_length(m);
        } else if (json_is_array(m) && json_array_size(m) == 2 &&
                   json_is_string(json_array_get(m, 0)) && json_is_string(json_array_get(m, 1))) {
            /* newer format: ["left", "right"] */
            json_t *a = json_array_get(m, 0), *b = json_array_get(m, 1);
            size_t la = json_string_length(a), lb = json_string_length(b);
            char *s = malloc(la + lb + 2);
            if (s) {
                memcpy(s, json_string_value(a), la);
                s[la] = ' ';
                memcpy(s + la + 1, json_string_value(b), lb);
                s[la + lb + 1] = '\0';
            }
            tj->merges[i] = s;
            tj->merge_lens[i] = la + lb + 1;
        } else {
            return ds4_err_set(err, DS4_E_FORMAT,
                               "tokenizer.json: model.merges[%zu] is neither \"a b\" nor [a, b]", i);
        }
        if (!tj->merges[i]) return ds4_err_set(err, DS4_E_NOMEM, "tokenizer.json: out of memory");
    }
    return 0;
}

/* Ids past this are refused before the tables are allocated (an id of 2^31
 * made the loader allocate and pad ~10^9 entries before any size check; V4's
 * vocabulary has 129,280 ids). */
#define TOKJSON_MAX_ID (1 << 20)

/* Highest id used by model.vocab and added_tokens; fails on a bad entry. */
static int max_id(json_t *vocab, json_t *added, int *out, ds4_err *err) {
    json_int_t hi = -1;
    const char *key;
    json_t *v;
    json_object_foreach(vocab, key, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= INT32_MAX)
            return ds4_err_set(err, DS4_E_FORMAT, "tokenizer.json: model.vocab[\"%.80s\"] is not an id",
                               key);
        if (json_integer_value(v) >= TOKJSON_MAX_ID)
            return ds4_err_set(err, DS4_E_FORMAT, "tokenizer.json: model.vocab[\"%.80s\"] = %lld, past the largest "
                               "id a tokenizer here may use (%d)", key, (long long)json_integer_value(v),
                               TOKJSON_MAX_ID - 1);
        if (json_integer_value(v) > hi) hi = json_integer_value(v);
    }
    size_t i;
    json_array_foreach(added, i, v) {
        json_t *id = json_object_get(v, "id"), *c = json_object_get(v, "content");
        if (!json_is_integer(id) || json_integer_value(id) < 0 ||
            json_integer_value(id) >= INT32_MAX || !json_is_string(c))
            return ds4_err_set(err, DS4_E_FORMAT,
                               "tokenizer.json: added_tokens[%zu] lacks an id or content", i);
        if (json_integer_value(id) >= TOKJSON_MAX_ID)
            return ds4_err_set(err, DS4_E_FORMAT, "tokenizer.json: added_tokens[%zu] has id %lld, past the largest "
                               "id a tokenizer here may use (%d)", i, (long long)json_integer_value(id),
                               TOKJSON_MAX_ID - 1);
        if (json_integer_value(id) > hi) hi = json_integer_value(id);
    }
    *out = (int)hi;
    return 0;
}

static int fill_tokens(ds4_tokjson *tj, json_t *vocab, json_t *added, ds4_err *err) {
    const char *key;
    json_t *v;
    int rc;
    /* byte-level vocabulary strings never contain NUL (0x00 is Ā), so the
     * NUL-terminated keys jansson gives are complete */
    json_object_foreach(vocab, key, v) {
        size_t kl = strlen(key);
        if ((rc = set_token(tj, (int)json_integer_value(v), key, kl, TT_NORMAL, err))) return rc;
    }
    size_t i;
    json_array_foreach(added, i, v) {
        json_t *c = json_object_get(v, "content");
        const char *s = json_string_value(c);
        size_t n = json_string_length(c);
        int special = json_is_true(json_object_get(v, "special"));
        int tt = special || looks_special(s, n) ? TT_CONTROL : TT_USER;
        if ((rc = set_token(tj, (int)json_integer_value(json_object_get(v, "id")), s, n, tt, err)))
            return rc;
    }
    return 0;
}

/* Adds the V4 tokens that are missing, at their V4 id when free. */
static int add_v4_tokens(ds4_tokjson *tj, int *n_used, ds4_err *err) {
    for (size_t k = 0; k < sizeof k_v4_added / sizeof k_v4_added[0]; k++) {
        if (find_token(tj, k_v4_added[k].str) >= 0) continue;
        int id = k_v4_added[k].id;
        if (id >= tj->n_tokens || tj->tokens[id]) id = *n_used;
        if (id >= tj->n_tokens)
            return ds4_err_set(err, DS4_E_INTERNAL, "tokenizer.json: no room for V4 tokens");
        int rc = set_token(tj, id, k_v4_added[k].str, strlen(k_v4_added[k].str), TT_CONTROL, err);
        if (rc) return rc;
        if (id >= *n_used) *n_used = id + 1;
    }
    return 0;
}

/* The converter's one JSON file reader (config.json, the safetensors index,
 * tokenizer.json); here because the tokenizer tests compile this file alone. */
json_t *ds4_conv_load_json(const char *path, size_t flags, ds4_err *err) {
    int fd = ds4_open_regular(path, O_RDONLY, NULL, err);
    if (fd < 0) return NULL;
    /* through stdio: jansson's json_loadfd reads one byte per read() call (20 M syscalls, ~10 s, for the
     * V3 tokenizer.json); json_loadf reads buffered */
    FILE *f = fdopen(fd, "rb");
    if (!f) {
        close(fd);
        ds4_err_set(err, DS4_E_IO, "%s: %s", path, strerror(errno));
        return NULL;
    }
    json_error_t je;
    json_t *root = json_loadf(f, flags, &je);
    fclose(f);
    if (!root) ds4_err_set(err, DS4_E_FORMAT, "%s: %s (line %d)", path, je.text, je.line);
    return root;
}

int ds4_tokjson_load(ds4_tokjson *tj, const char *path, int pad_to, ds4_err *err) {
    memset(tj, 0, sizeof *tj);
    json_t *root = ds4_conv_load_json(path, JSON_ALLOW_NUL, err);
    if (!root) return err ? err->code : DS4_E_IO;
    int rc = 0;
    json_t *model = json_object_get(root, "model");
    json_t *type = json_object_get(model, "type");
    json_t *vocab = json_object_get(model, "vocab");
    json_t *merges = json_object_get(model, "merges");
    json_t *added = json_object_get(root, "added_tokens");
    const char *tname = json_string_value(type);
    if (!json_is_object(model) || (type && (!tname || strcmp(tname, "BPE") != 0)) ||
        !json_is_object(vocab) || !json_is_array(merges) || (added && !json_is_array(added))) {
        rc = ds4_err_set(err, DS4_E_FORMAT, "%s: not a BPE tokenizer.json (model.type, "
                         "model.vocab, model.merges)", path);
        goto done;
    }
    int hi = -1;
    if ((rc = max_id(vocab, added, &hi, err))) goto done;
    /* room for the V4 tokens (at most 3 appended) and the padding */
    int n_used = hi + 1;
    int n = n_used + 3;
    if (128826 > n) n = 128826;
    if (pad_to > n) n = pad_to;
    tj->n_tokens = n;
    tj->tokens = calloc((size_t)n, sizeof(char *));
    tj->token_lens = calloc((size_t)n, sizeof(size_t));
    tj->token_type = calloc((size_t)n, sizeof(int32_t));
    if (!tj->tokens || !tj->token_lens || !tj->token_type) {
        rc = ds4_err_set(err, DS4_E_NOMEM, "tokenizer.json: out of memory");
        goto done;
    }
    if ((rc = fill_tokens(tj, vocab, added, err))) goto done;
    if ((rc = add_v4_tokens(tj, &n_used, err))) goto done;
    /* the table ends at the padding width, or right after the last id */
    tj->n_tokens = pad_to > n_used ? pad_to : n_used;
    for (int i = n_used; i < n; i++) free(tj->tokens[i]), tj->tokens[i] = NULL;
    for (int i = 0; i < tj->n_tokens; i++) {
        if (tj->tokens[i]) continue;
        char pad[32];
        int l = snprintf(pad, sizeof pad, "[PAD%d]", i);
        if ((rc = set_token(tj, i, pad, (size_t)l, TT_UNUSED, err))) goto done;
    }
    if ((rc = load_merges(tj, merges, err))) goto done;
    tj->bos_id = find_token(tj, BOS_STR);
    tj->eos_id = find_token(tj, EOS_STR);
    tj->pad_id = find_token(tj, PAD_STR);
done:
    json_decref(root);
    if (rc) {
        ds4_tokjson_free(tj);
        tj->n_tokens = 0;
    }
    return rc;
}

int ds4_convert_add_tokenizer(ds4_gguf_writer *w, const char *tokenizer_json_path, ds4_err *err) {
    ds4_tokjson tj;
    int rc = ds4_tokjson_load(&tj, tokenizer_json_path, DS4_CONVERT_V4_N_VOCAB, err);
    if (rc) return rc;
    ds4_gguf_writer_add_str(w, "tokenizer.ggml.model", "gpt2", 4);
    ds4_gguf_writer_add_str(w, "tokenizer.ggml.pre", "joyai-llm", 9);
    ds4_gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)tj.tokens,
                                tj.token_lens, (uint64_t)tj.n_tokens);
    ds4_gguf_writer_add_arr(w, "tokenizer.ggml.token_type", DS4_GGUF_I32, tj.token_type,
                            (uint64_t)tj.n_tokens);
    ds4_gguf_writer_add_arr_str(w, "tokenizer.ggml.merges", (const char *const *)tj.merges,
                                tj.merge_lens, (uint64_t)tj.n_merges);
    if (tj.bos_id >= 0) ds4_gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)tj.bos_id);
    if (tj.eos_id >= 0) ds4_gguf_writer_add_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)tj.eos_id);
    if (tj.pad_id >= 0)
        ds4_gguf_writer_add_u32(w, "tokenizer.ggml.padding_token_id", (uint32_t)tj.pad_id);
    ds4_gguf_writer_add_bool(w, "tokenizer.ggml.add_bos_token", true);
    /* the last add's status; earlier failures are kept by the writer and
     * returned by its write call */
    rc = ds4_gguf_writer_add_bool(w, "tokenizer.ggml.add_eos_token", false);
    ds4_tokjson_free(&tj);
    if (rc) return ds4_err_set(err, rc, "tokenizer: adding GGUF keys failed (duplicate key?)");
    return 0;
}
