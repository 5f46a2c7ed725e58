/* kvstore.c - disk checkpoints of opaque payloads (see kvstore.h).
 *
 * File layout, version 2 (little-endian). Bytes 0..51 keep the meaning of
 * docs/SERVING.md C.5 where a field exists there; version 1 (antirez/ds4: key text
 * only, no tokens, no digests) is not read, such files are rejected.
 *
 *   offset size
 *   0      3    magic "KVC"
 *   3      1    version = 2
 *   4      1    routed-expert quant bits (informative)
 *   5      1    save reason (DS4_KV_REASON_*)
 *   6      1    ext flags (DS4_KV_EXT_*)
 *   7      1    reserved 0
 *   8      4    u32 token count n (>= 1)
 *   12     4    u32 hit count           (mutable: not covered by digests)
 *   16     4    u32 ctx size the payload was written with
 *   20     4    u32 key text bytes T
 *   24     8    u64 created (unix s)
 *   32     8    u64 last used (unix s)   (mutable: not covered by digests)
 *   40     8    u64 payload bytes PB
 *   48     8    u64 trailer bytes TB
 *   56     32   model fingerprint
 *   88     32   SHA-256(payload)
 *   120    32   SHA-256(trailer)
 *   152    32   SHA-256(bytes 0..151 with the mutable fields zeroed, tokens, key text)
 *   184    4n   tokens (u32 each)
 *   ...    T    key text
 *   ...    PB   payload (opaque: the engine's session payload)
 *   ...    TB   trailer (opaque: e.g. the tool map of C.6)
 *
 * The file size must equal 184 + 4n + T + PB + TB exactly. The file name is
 * hex(SHA-256(fingerprint, u32 n, tokens, key text)[0..20)) + ".kv", so a
 * renamed or copied file is detected. The header digest lets the start-up
 * scan trust tokens and key without reading payloads; the payload and trailer
 * digests are checked when they are read.
 *
 * Deviations from antirez/ds4 (docs/SERVING.md C.4/C.5), deliberate: names hash
 * the token prefix (plus fingerprint and key text) instead of SHA-1 of the
 * key text, so token-prefix lookups work without rendering text; text-keyed
 * lookups (C.2 rule 8, visible keys of C.3) use ds4_kvstore_find_text on the
 * stored key text. Any file that fails validation is removed (C.4 keeps some),
 * since a digest mismatch can only mean damage.
 *
 * Invariants: the in-memory index holds exactly the files of this model that
 * passed the header-region validation; total_bytes is the sum of their sizes.
 * Index mutations and renames/unlinks happen under mu; bulk reads and writes
 * of file contents happen outside it (an unlinked file stays readable through
 * an open descriptor, and a rename is atomic).
 */
#include "kvstore.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "util/file.h"

#define HDR_BYTES 184
#define HDR_DIGEST_OFF 152
#define VERSION 2
#define LOCK_FILE ".ds4-kvstore.lock" /* held by the open store (flock) */
#define KEY_MAX_BYTES (1ull << 30)   /* sanity bound on key text (1 GiB) */
#define KV_MAX_TOKENS (1u << 22) /* 4M tokens: four times the model's 1M context */
#define HALF_LIFE_S 21600.0          /* hit decay for eviction scores (C.4) */

typedef struct kv_ent {
    ds4_kvstore_entry e;
    int32_t *tokens; /* (e.n_tokens) */
    char *key;       /* (e.key_text_bytes), may be NULL when empty */
} kv_ent;

struct ds4_kvstore {
    char *dir;
    uint64_t budget;
    uint8_t fp[32];
    ds4_kvstore_log_fn log;
    void *log_user;
    pthread_mutex_t mu;
    kv_ent *ents; /* (n_ents) */
    int n_ents, cap_ents;
    uint64_t total;
    unsigned tmp_counter;
    int lock_fd; /* LOCK_FILE, held (flock) while open; -1 when it could not be opened */
};

/* ---- small helpers --------------------------------------------------------- */

static void put_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put_u64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get_u32(const uint8_t *p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
static uint64_t get_u64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static void logf_kv(ds4_kvstore *kv, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void logf_kv(ds4_kvstore *kv, const char *fmt, ...) {
    if (!kv->log) return;
    char line[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    kv->log(kv->log_user, line);
}

/* Incremental SHA-256 over several parts; returns 0 or -1. */
typedef struct { EVP_MD_CTX *c; } sha_ctx;
static int sha_begin(sha_ctx *s) {
    s->c = EVP_MD_CTX_new();
    return s->c && EVP_DigestInit_ex(s->c, EVP_sha256(), NULL) == 1 ? 0 : -1;
}
static void sha_add(sha_ctx *s, const void *p, size_t n) {
    if (n) EVP_DigestUpdate(s->c, p, n);
}
static int sha_end(sha_ctx *s, uint8_t out[32]) {
    unsigned int len = 0;
    int ok = EVP_DigestFinal_ex(s->c, out, &len) == 1 && len == 32;
    EVP_MD_CTX_free(s->c);
    s->c = NULL;
    return ok ? 0 : -1;
}
static int sha256(const void *p, size_t n, uint8_t out[32]) {
    sha_ctx s;
    if (sha_begin(&s)) { EVP_MD_CTX_free(s.c); return -1; }
    sha_add(&s, p, n);
    return sha_end(&s, out);
}

/* Tokens as little-endian u32 bytes (the on-disk form). out: (4n). */
static void tokens_to_le(const int32_t *t, uint32_t n, uint8_t *out) {
    for (uint32_t i = 0; i < n; i++) put_u32(out + 4 * (size_t)i, (uint32_t)t[i]);
}

/* name = hex(SHA-256(fp, u32 n, tokens_le, key)[0..20)) + ".kv" */
static int make_name(const uint8_t fp[32], const uint8_t *tok_le, uint32_t n, const char *key,
                     size_t key_bytes, char name[DS4_KV_NAME_MAX]) {
    sha_ctx s;
    uint8_t nb[4], d[32];
    if (sha_begin(&s)) { EVP_MD_CTX_free(s.c); return -1; }
    put_u32(nb, n);
    sha_add(&s, fp, 32);
    sha_add(&s, nb, 4);
    sha_add(&s, tok_le, 4 * (size_t)n);
    sha_add(&s, key, key_bytes);
    if (sha_end(&s, d)) return -1;
    for (int i = 0; i < 20; i++) sprintf(name + 2 * i, "%02x", d[i]);
    strcpy(name + 40, ".kv");
    return 0;
}

/* lower-case only, as make_name writes them: "ABC...kv" is not this store's
 * name (it would open the same entry under a second name: counted once, on
 * disk twice, never evicted) and is left alone like any other file */
static int is_hex40(const char *s) {
    for (int i = 0; i < 40; i++) {
        char c = s[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
            return 0;
    }
    return 1;
}
/* "<40 hex>.kv" */
static int is_kv_name(const char *s) {
    return strlen(s) == 43 && is_hex40(s) && !strcmp(s + 40, ".kv");
}
/* "<40 hex>.kv.tmp.<pid>.<n>": returns the pid, or -1 when not a temp name. */
static long tmp_name_pid(const char *s) {
    if (strlen(s) < 49 || !is_hex40(s) || strncmp(s + 40, ".kv.tmp.", 8)) return -1;
    char *end;
    long pid = strtol(s + 48, &end, 10);
    if (end == s + 48 || *end != '.' || pid <= 0) return -1;
    return pid;
}

static char *join_path(const char *dir, const char *name) {
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (!p) return NULL;
    memcpy(p, dir, a);
    p[a] = '/';
    memcpy(p + a + 1, name, b + 1);
    return p;
}

static int read_full(int fd, void *buf, size_t n, uint64_t off) {
    uint8_t *p = buf;
    while (n) {
        size_t chunk = n > (1u << 30) ? (1u << 30) : n;
        ssize_t r = pread(fd, p, chunk, (off_t)off);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1; /* error or unexpected end of file */
        p += r;
        n -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

static int write_full(int fd, const void *buf, size_t n) {
    const uint8_t *p = buf;
    while (n) {
        size_t chunk = n > (1u << 30) ? (1u << 30) : n;
        ssize_t w = write(fd, p, chunk);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) return -1;
        if (w == 0) { errno = ENOSPC; return -1; }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int fsync_dir(const char *dir) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -1;
    int r = fsync(fd);
    int e = errno;
    close(fd);
    errno = e;
    return r;
}

/* ---- header ---------------------------------------------------------------- */

typedef struct hdr {
    uint8_t quant_bits, reason, ext_flags;
    uint32_t n_tokens, hits, ctx_size, key_bytes;
    uint64_t created, last_used, payload_bytes, trailer_bytes;
    uint8_t fp[32], payload_sha[32], trailer_sha[32], meta_sha[32];
} hdr;

static void hdr_encode(const hdr *h, uint8_t b[HDR_BYTES]) {
    memset(b, 0, HDR_BYTES);
    memcpy(b, "KVC", 3);
    b[3] = VERSION;
    b[4] = h->quant_bits;
    b[5] = h->reason;
    b[6] = h->ext_flags;
    put_u32(b + 8, h->n_tokens);
    put_u32(b + 12, h->hits);
    put_u32(b + 16, h->ctx_size);
    put_u32(b + 20, h->key_bytes);
    put_u64(b + 24, h->created);
    put_u64(b + 32, h->last_used);
    put_u64(b + 40, h->payload_bytes);
    put_u64(b + 48, h->trailer_bytes);
    memcpy(b + 56, h->fp, 32);
    memcpy(b + 88, h->payload_sha, 32);
    memcpy(b + 120, h->trailer_sha, 32);
    memcpy(b + 152, h->meta_sha, 32);
}

static void hdr_decode(const uint8_t b[HDR_BYTES], hdr *h) {
    h->quant_bits = b[4];
    h->reason = b[5];
    h->ext_flags = b[6];
    h->n_tokens = get_u32(b + 8);
    h->hits = get_u32(b + 12);
    h->ctx_size = get_u32(b + 16);
    h->key_bytes = get_u32(b + 20);
    h->created = get_u64(b + 24);
    h->last_used = get_u64(b + 32);
    h->payload_bytes = get_u64(b + 40);
    h->trailer_bytes = get_u64(b + 48);
    memcpy(h->fp, b + 56, 32);
    memcpy(h->payload_sha, b + 88, 32);
    memcpy(h->trailer_sha, b + 120, 32);
    memcpy(h->meta_sha, b + 152, 32);
}

/* Digest of the header region: bytes 0..151 with hits and last_used zeroed
 * (they are rewritten in place on every hit), then tokens, then key text. */
static int meta_digest(const uint8_t b[HDR_BYTES], const uint8_t *tok_le, uint32_t n,
                       const char *key, size_t key_bytes, uint8_t out[32]) {
    uint8_t m[HDR_DIGEST_OFF];
    memcpy(m, b, HDR_DIGEST_OFF);
    memset(m + 12, 0, 4);
    memset(m + 32, 0, 8);
    sha_ctx s;
    if (sha_begin(&s)) { EVP_MD_CTX_free(s.c); return -1; }
    sha_add(&s, m, sizeof m);
    sha_add(&s, tok_le, 4 * (size_t)n);
    sha_add(&s, key, key_bytes);
    return sha_end(&s, out);
}

/* Checked file size: HDR + 4n + T + PB + TB; 0 on overflow. */
static uint64_t file_size_of(uint32_t n, uint64_t key, uint64_t pb, uint64_t tb) {
    uint64_t s = HDR_BYTES + 4 * (uint64_t)n + key;
    if (pb > UINT64_MAX - s) return 0;
    s += pb;
    if (tb > UINT64_MAX - s) return 0;
    return s + tb;
}

/* Reads and validates the header region of an open file: magic, version,
 * sizes against the real file size, the header digest, and that the name is
 * the one the content implies. On success fills *h, *tokens, *key (malloc'ed;
 * key NUL-terminated) and returns 0. Returns DS4_E_FORMAT with a reason for a
 * bad file, DS4_E_IO / DS4_E_NOMEM otherwise. */
static int read_meta(int fd, const char *name, hdr *h, uint8_t raw[HDR_BYTES], int32_t **tokens,
                     char **key, uint64_t *fsize, ds4_err *err) {
    struct stat st;
    *tokens = NULL;
    *key = NULL;
    if (fstat(fd, &st) != 0) return ds4_err_set(err, DS4_E_IO, "%s: stat: %s", name, strerror(errno));
    uint64_t size = (uint64_t)st.st_size;
    *fsize = size;
    if (size < HDR_BYTES)
        return ds4_err_set(err, DS4_E_FORMAT, "%s: truncated: %llu bytes, the header needs %d",
                           name, (unsigned long long)size, HDR_BYTES);
    if (read_full(fd, raw, HDR_BYTES, 0))
        return ds4_err_set(err, DS4_E_FORMAT, "%s: short read of the header (truncated file)", name);
    if (memcmp(raw, "KVC", 3))
        return ds4_err_set(err, DS4_E_FORMAT, "%s: bad magic (not a ds4 KV cache file)", name);
    if (raw[3] != VERSION)
        return ds4_err_set(err, DS4_E_FORMAT, "%s: unsupported version %u (expected %d)", name,
                           raw[3], VERSION);
    hdr_decode(raw, h);
    if (h->n_tokens == 0) return ds4_err_set(err, DS4_E_FORMAT, "%s: token count is 0", name);
    if (h->n_tokens > KV_MAX_TOKENS) /* before sizing buffers by it */
        return ds4_err_set(err, DS4_E_FORMAT, "%s: token count %u is beyond any context (%u)", name, h->n_tokens,
                           (unsigned)KV_MAX_TOKENS);
    if (h->key_bytes > KEY_MAX_BYTES)
        return ds4_err_set(err, DS4_E_FORMAT, "%s: key text of %u bytes is too large", name,
                           h->key_bytes);
    uint64_t want = file_size_of(h->n_tokens, h->key_bytes, h->payload_bytes, h->trailer_bytes);
    if (!want)
        return ds4_err_set(err, DS4_E_FORMAT, "%s: header declares sizes beyond any file (payload %llu, trailer %llu "
                           "bytes): corrupt", name, (unsigned long long)h->payload_bytes,
                           (unsigned long long)h->trailer_bytes);
    if (want != size)
        return ds4_err_set(err, DS4_E_FORMAT,
                           "%s: size mismatch: file has %llu bytes, header declares %llu "
                           "(truncated or corrupt)",
                           name, (unsigned long long)size, (unsigned long long)want);
    size_t tok_bytes = 4 * (size_t)h->n_tokens;
    uint8_t *tok_le = malloc(tok_bytes);
    int32_t *tok = malloc(tok_bytes);
    char *k = malloc((size_t)h->key_bytes + 1);
    if (!tok_le || !tok || !k) {
        free(tok_le); free(tok); free(k);
        return ds4_err_set(err, DS4_E_NOMEM, "%s: out of memory reading %u tokens", name,
                           h->n_tokens);
    }
    int rc = 0;
    uint8_t d[32];
    char expect[DS4_KV_NAME_MAX];
    if (read_full(fd, tok_le, tok_bytes, HDR_BYTES) ||
        read_full(fd, k, h->key_bytes, HDR_BYTES + tok_bytes)) {
        rc = ds4_err_set(err, DS4_E_FORMAT, "%s: short read of tokens/key (truncated file)", name);
    } else if (meta_digest(raw, tok_le, h->n_tokens, k, h->key_bytes, d)) {
        rc = ds4_err_set(err, DS4_E_INTERNAL, "%s: SHA-256 failed", name);
    } else if (memcmp(d, h->meta_sha, 32)) {
        rc = ds4_err_set(err, DS4_E_FORMAT, "%s: header digest mismatch (corrupt header, tokens "
                         "or key)", name);
    } else if (make_name(h->fp, tok_le, h->n_tokens, k, h->key_bytes, expect)) {
        rc = ds4_err_set(err, DS4_E_INTERNAL, "%s: SHA-256 failed", name);
    } else if (strncmp(expect, name, 40)) {
        rc = ds4_err_set(err, DS4_E_FORMAT, "%s: content does not match the file name "
                         "(renamed or copied file)", name);
    }
    if (rc) {
        free(tok_le); free(tok); free(k);
        return rc;
    }
    for (uint32_t i = 0; i < h->n_tokens; i++) tok[i] = (int32_t)get_u32(tok_le + 4 * (size_t)i);
    k[h->key_bytes] = '\0';
    free(tok_le);
    *tokens = tok;
    *key = k;
    return 0;
}

static void fill_entry(ds4_kvstore_entry *e, const char *name, const hdr *h, uint64_t fsize) {
    memset(e, 0, sizeof *e);
    snprintf(e->name, sizeof e->name, "%s", name);
    e->n_tokens = h->n_tokens;
    e->hits = h->hits;
    e->ctx_size = h->ctx_size;
    e->quant_bits = h->quant_bits;
    e->reason = h->reason > 6 ? 0 : h->reason;
    e->ext_flags = h->ext_flags;
    e->created = h->created;
    e->last_used = h->last_used;
    e->payload_bytes = h->payload_bytes;
    e->trailer_bytes = h->trailer_bytes;
    e->key_text_bytes = h->key_bytes;
    e->file_bytes = fsize;
}

/* ---- index (callers hold mu) -------------------------------------------- */

static int find_ent(ds4_kvstore *kv, const char *name) {
    for (int i = 0; i < kv->n_ents; i++)
        if (!strcmp(kv->ents[i].e.name, name)) return i;
    return -1;
}

static void drop_ent(ds4_kvstore *kv, int i) {
    kv->total -= kv->ents[i].e.file_bytes;
    free(kv->ents[i].tokens);
    free(kv->ents[i].key);
    kv->ents[i] = kv->ents[--kv->n_ents];
}

/* Takes ownership of tokens and key. Replaces an entry of the same name. */
static int add_ent(ds4_kvstore *kv, const ds4_kvstore_entry *e, int32_t *tokens, char *key) {
    int i = find_ent(kv, e->name);
    if (i >= 0) drop_ent(kv, i);
    if (kv->n_ents == kv->cap_ents) {
        int cap = kv->cap_ents ? kv->cap_ents * 2 : 16;
        kv_ent *n = realloc(kv->ents, (size_t)cap * sizeof *n);
        if (!n) return DS4_E_NOMEM;
        kv->ents = n;
        kv->cap_ents = cap;
    }
    kv->ents[kv->n_ents++] = (kv_ent){*e, tokens, key};
    kv->total += e->file_bytes;
    return 0;
}

/* Unlinks dir/name (only when it is still the file open as fd, if fd >= 0, so
 * a concurrently renamed replacement is not deleted) and drops it from the
 * index either way: an entry that cannot be removed is no longer trusted.
 * Returns 0 when the file is gone (removed, replaced or already missing), or
 * the errno of the failed unlink, so callers never report a file removed
 * that is still there. */
static int remove_file_locked(ds4_kvstore *kv, const char *name, int fd) {
    int rc = 0;
    char *path = join_path(kv->dir, name);
    if (path) {
        struct stat a, b;
        int same = fd < 0 || (fstat(fd, &a) == 0 && stat(path, &b) == 0 && a.st_ino == b.st_ino &&
                              a.st_dev == b.st_dev);
        if (same && unlink(path) != 0 && errno != ENOENT) rc = errno;
        free(path);
    } else {
        rc = ENOMEM;
    }
    int i = find_ent(kv, name);
    if (i >= 0) drop_ent(kv, i);
    return rc;
}

/* C.4 score: (effective_hits + 1) * tokens / file_size, hits halving every 6 h. */
static double ent_score(const ds4_kvstore_entry *e, uint64_t now) {
    uint64_t lu = e->last_used ? e->last_used : e->created;
    double age = now > lu ? (double)(now - lu) : 0.0;
    double eh = (double)e->hits * pow(2.0, -age / HALF_LIFE_S);
    if (eh < 0.01) eh = 0.0;
    return (eh + 1.0) * (double)e->n_tokens / (double)(e->file_bytes ? e->file_bytes : 1);
}

/* Deletes lowest-score files until total <= target; `protect` (may be NULL)
 * is kept; `why` ends the log line of each. */
static void evict_down_to(ds4_kvstore *kv, const char *protect, uint64_t target, const char *why) {
    uint64_t now = (uint64_t)time(NULL);
    while (kv->total > target) {
        int worst = -1;
        double ws = 0;
        for (int i = 0; i < kv->n_ents; i++) {
            const ds4_kvstore_entry *e = &kv->ents[i].e;
            if (protect && !strcmp(e->name, protect)) continue;
            double s = ent_score(e, now);
            uint64_t lu = e->last_used ? e->last_used : e->created;
            const ds4_kvstore_entry *w = worst >= 0 ? &kv->ents[worst].e : NULL;
            uint64_t wlu = w ? (w->last_used ? w->last_used : w->created) : 0;
            if (worst < 0 || s < ws || (s == ws && lu < wlu)) {
                worst = i;
                ws = s;
            }
        }
        if (worst < 0) break;
        char name[DS4_KV_NAME_MAX];
        snprintf(name, sizeof name, "%s", kv->ents[worst].e.name);
        logf_kv(kv, "kvstore: evicting %s (%u tokens, %llu bytes, score %.3g) %s", name, kv->ents[worst].e.n_tokens,
                (unsigned long long)kv->ents[worst].e.file_bytes, ws, why);
        int e = remove_file_locked(kv, name, -1);
        if (e)
            logf_kv(kv, "kvstore: cannot remove %s: %s (dropped from the index; its space stays in "
                    "use)", name, strerror(e));
    }
}

/* Deletes lowest-score files until total <= budget (see evict_down_to). */
static void evict_locked(ds4_kvstore *kv, const char *protect) {
    if (!kv->budget) return;
    char why[96];
    snprintf(why, sizeof why, "to stay under %llu bytes", (unsigned long long)kv->budget);
    evict_down_to(kv, protect, kv->budget, why);
}

/* ---- open / close ------------------------------------------------------------ */

static int scan_dir(ds4_kvstore *kv, ds4_err *err) {
    DIR *d = opendir(kv->dir);
    if (!d) return ds4_err_set(err, DS4_E_IO, "kvstore: cannot read %s: %s", kv->dir, strerror(errno));
    struct dirent *de;
    int rc = 0, foreign_n = 0;
    uint64_t foreign_bytes = 0;
    while (!rc && (de = readdir(d))) {
        const char *nm = de->d_name;
        long pid = tmp_name_pid(nm);
        if (pid > 0) {
            /* A temp file of a crashed (or our own earlier) writer: never valid. A dead pid's goes; so does,
             * while this store holds the directory's lock, one not written for 10 minutes whatever process
             * has its pid now (pids are reused, routinely in containers: such a file stayed forever; a live
             * writer without the lock, e.g. another user's server that could not open the lock file, keeps
             * its file fresh). */
            struct stat tst;
            char *tp = join_path(kv->dir, nm);
            const bool stale = kv->lock_fd >= 0 && tp && lstat(tp, &tst) == 0 && time(NULL) - tst.st_mtime > 600;
            free(tp);
            if (stale || pid == (long)getpid() || (kill((pid_t)pid, 0) != 0 && errno == ESRCH)) {
                char *p = join_path(kv->dir, nm);
                if (p && unlink(p) == 0) logf_kv(kv, "kvstore: removed leftover temp file %s", nm);
                free(p);
            }
            continue;
        }
        if (!is_kv_name(nm)) continue;
        char *path = join_path(kv->dir, nm);
        if (!path) { rc = DS4_E_NOMEM; break; }
        ds4_err e2 = {0};
        /* A FIFO named like an entry would block open() (and start-up with
         * it); a directory or device is not ours either: reported, kept. */
        int fd = ds4_open_regular(path, O_RDONLY, NULL, &e2);
        if (fd < 0) {
            if (errno == EINVAL) logf_kv(kv, "kvstore: ignored, left in place: %s", e2.msg);
            else if (errno != ENOENT) logf_kv(kv, "kvstore: ignored: %s", e2.msg); /* e.g. no permission */
            free(path);
            continue;
        }
        hdr h;
        uint8_t raw[HDR_BYTES];
        int32_t *tok;
        char *key;
        uint64_t fsize;
        int r = read_meta(fd, nm, &h, raw, &tok, &key, &fsize, &e2);
        if (r == DS4_E_FORMAT) {
            if (unlink(path) == 0 || errno == ENOENT)
                logf_kv(kv, "kvstore: removed invalid file: %s", e2.msg);
            else
                logf_kv(kv, "kvstore: invalid file cannot be removed (%s), ignored: %s",
                        strerror(errno), e2.msg);
        } else if (r == 0 && memcmp(h.fp, kv->fp, 32) != 0) {
            free(tok); /* another model's file: leave it alone (counted for the log line below) */
            free(key);
            foreign_n++;
            foreign_bytes += fsize;
        } else if (r == 0) {
            ds4_kvstore_entry e;
            fill_entry(&e, nm, &h, fsize);
            if (add_ent(kv, &e, tok, key)) { free(tok); free(key); rc = DS4_E_NOMEM; }
        } else if (r == DS4_E_NOMEM) {
            rc = r;
        } else if (r) {
            logf_kv(kv, "kvstore: cannot read %s, ignored: %s", nm, e2.msg);
        }
        close(fd);
        free(path);
    }
    closedir(d);
    if (rc) return ds4_err_set(err, rc, "kvstore: out of memory scanning %s", kv->dir);
    /* they take disk space that the budget neither counts nor frees: say so (files of an older engine's
     * fingerprint, e.g. after an upgrade, stay there otherwise unnoticed) */
    if (foreign_n)
        logf_kv(kv, "kvstore: %d file%s (%.1f MiB) of other models in %s: not counted against the budget and "
                "never evicted by this server (remove them by hand if that model is gone)", foreign_n,
                foreign_n == 1 ? "" : "s", (double)foreign_bytes / 1048576.0, kv->dir);
    return 0;
}

int ds4_kvstore_open(ds4_kvstore **out, const ds4_kvstore_opts *opts, ds4_err *err) {
    *out = NULL;
    if (!opts || !opts->dir || !*opts->dir) return ds4_err_set(err, DS4_E_ARG, "kvstore: no directory");
    if (mkdir(opts->dir, 0700) != 0 && errno != EEXIST) /* prompts are stored in the clear: the owner's only */
        return ds4_err_set(err, DS4_E_IO, "kvstore: cannot create %s: %s", opts->dir, strerror(errno));
    struct stat st;
    if (stat(opts->dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return ds4_err_set(err, DS4_E_IO, "kvstore: %s is not a directory", opts->dir);
    ds4_kvstore *kv = calloc(1, sizeof *kv);
    if (!kv || !(kv->dir = strdup(opts->dir))) {
        free(kv);
        return ds4_err_set(err, DS4_E_NOMEM, "kvstore: out of memory");
    }
    kv->budget = opts->budget_bytes;
    memcpy(kv->fp, opts->fingerprint, 32);
    kv->log = opts->log;
    kv->log_user = opts->log_user;
    pthread_mutex_init(&kv->mu, NULL);
    /* One store per directory: each enforces the budget on its own index
     * and evicts the other's files, so a second one is refused. A directory
     * where the lock file cannot be made (read-only) is used without it. */
    char *lp = join_path(kv->dir, LOCK_FILE);
    kv->lock_fd = lp ? open(lp, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600) : -1;
    if (lp && kv->lock_fd < 0) kv->lock_fd = open(lp, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (kv->lock_fd < 0) {
        logf_kv(kv, "kvstore: cannot open the lock file %s (%s): this directory is not locked against a second "
                "server", lp ? lp : LOCK_FILE, strerror(errno));
    } else if (flock(kv->lock_fd, LOCK_EX | LOCK_NB) != 0) {
        int e = errno;
        free(lp);
        ds4_kvstore_close(kv);
        if (e == EWOULDBLOCK)
            return ds4_err_set(err, DS4_E_IO, "kvstore: %s is in use by another process (one disk cache "
                               "directory per server)", opts->dir);
        return ds4_err_set(err, DS4_E_IO, "kvstore: cannot lock %s: %s", opts->dir, strerror(e));
    }
    free(lp);
    int rc = scan_dir(kv, err);
    if (rc) {
        ds4_kvstore_close(kv);
        return rc;
    }
    pthread_mutex_lock(&kv->mu);
    evict_locked(kv, NULL);
    pthread_mutex_unlock(&kv->mu);
    *out = kv;
    return 0;
}

void ds4_kvstore_close(ds4_kvstore *kv) {
    if (!kv) return;
    for (int i = 0; i < kv->n_ents; i++) {
        free(kv->ents[i].tokens);
        free(kv->ents[i].key);
    }
    free(kv->ents);
    if (kv->lock_fd >= 0) close(kv->lock_fd); /* releases the flock */
    pthread_mutex_destroy(&kv->mu);
    free(kv->dir);
    free(kv);
}

/* ---- put --------------------------------------------------------------------- */

int ds4_kvstore_put(ds4_kvstore *kv, const ds4_kvstore_put_args *a, char name_out[DS4_KV_NAME_MAX],
                    ds4_err *err) {
    if (!a || !a->tokens || a->n_tokens == 0)
        return ds4_err_set(err, DS4_E_ARG, "kvstore: put needs at least one token");
    if ((a->key_text_bytes && !a->key_text) || (a->payload_bytes && !a->payload) ||
        (a->trailer_bytes && !a->trailer) || a->key_text_bytes > KEY_MAX_BYTES ||
        a->n_tokens > (UINT32_MAX - HDR_BYTES) / 4)
        return ds4_err_set(err, DS4_E_ARG, "kvstore: put: bad buffer arguments");
    if (a->n_tokens > KV_MAX_TOKENS) /* a load would refuse it */
        return ds4_err_set(err, DS4_E_RANGE, "kvstore: a checkpoint of %u tokens is beyond the cache's limit of %u",
                           (unsigned)a->n_tokens, (unsigned)KV_MAX_TOKENS);
    uint64_t fsize = file_size_of(a->n_tokens, a->key_text_bytes, a->payload_bytes, a->trailer_bytes);
    if (!fsize) return ds4_err_set(err, DS4_E_ARG, "kvstore: put: size overflow");
    /* a file that would take the whole budget with less than 1% to spare is refused (it would evict
     * everything else, every time) */
    if (kv->budget && fsize + fsize / 100 > kv->budget)
        return ds4_err_set(err, DS4_E_RANGE, "kvstore: checkpoint of %llu bytes (+1%%) exceeds the disk "
                           "budget of %llu bytes", (unsigned long long)fsize,
                           (unsigned long long)kv->budget);

    size_t tok_bytes = 4 * (size_t)a->n_tokens;
    uint8_t *tok_le = malloc(tok_bytes);
    int32_t *tok_copy = malloc(tok_bytes);
    char *key_copy = malloc(a->key_text_bytes + 1);
    char *tmp = NULL, *path = NULL;
    int fd = -1, rc = 0;
    if (!tok_le || !tok_copy || !key_copy) {
        rc = ds4_err_set(err, DS4_E_NOMEM, "kvstore: out of memory");
        goto out;
    }
    tokens_to_le(a->tokens, a->n_tokens, tok_le);
    memcpy(tok_copy, a->tokens, tok_bytes);
    if (a->key_text_bytes) memcpy(key_copy, a->key_text, a->key_text_bytes);
    key_copy[a->key_text_bytes] = '\0';

    hdr h = {
        .quant_bits = a->quant_bits, .reason = a->reason, .ext_flags = a->ext_flags,
        .n_tokens = a->n_tokens, .ctx_size = a->ctx_size, .key_bytes = (uint32_t)a->key_text_bytes,
        .payload_bytes = a->payload_bytes, .trailer_bytes = a->trailer_bytes,
    };
    h.created = h.last_used = (uint64_t)time(NULL);
    memcpy(h.fp, kv->fp, 32);
    uint8_t raw[HDR_BYTES];
    char name[DS4_KV_NAME_MAX];
    if (sha256(a->payload, a->payload_bytes, h.payload_sha) ||
        sha256(a->trailer, a->trailer_bytes, h.trailer_sha) ||
        make_name(kv->fp, tok_le, a->n_tokens, a->key_text, a->key_text_bytes, name)) {
        rc = ds4_err_set(err, DS4_E_INTERNAL, "kvstore: SHA-256 failed");
        goto out;
    }
    hdr_encode(&h, raw);
    if (meta_digest(raw, tok_le, a->n_tokens, a->key_text, a->key_text_bytes, h.meta_sha)) {
        rc = ds4_err_set(err, DS4_E_INTERNAL, "kvstore: SHA-256 failed");
        goto out;
    }
    memcpy(raw + HDR_DIGEST_OFF, h.meta_sha, 32);

    /* Write the complete file under a temp name in the same directory, make
     * it durable, and only then rename it over the final name: a reader or a
     * crash never sees a partial file under a ".kv" name. */
    char tmpname[DS4_KV_NAME_MAX + 48];
    pthread_mutex_lock(&kv->mu);
    unsigned ctr = kv->tmp_counter++;
    pthread_mutex_unlock(&kv->mu);
    snprintf(tmpname, sizeof tmpname, "%s.tmp.%ld.%u", name, (long)getpid(), ctr);
    tmp = join_path(kv->dir, tmpname);
    path = join_path(kv->dir, name);
    if (!tmp || !path) {
        rc = ds4_err_set(err, DS4_E_NOMEM, "kvstore: out of memory");
        goto out;
    }
    fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0 && errno == ENOENT && mkdir(kv->dir, 0700) == 0) {
        /* the directory was removed while the server ran: made again (every save failed until a restart) */
        logf_kv(kv, "kvstore: %s was gone: created it again", kv->dir);
        fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    }
    if (fd < 0) {
        rc = ds4_err_set(err, DS4_E_IO, "kvstore: cannot create %s: %s", tmp, strerror(errno));
        goto out;
    }
    /* Reserve the space first so a full disk fails before gigabytes are written. A full disk then makes room
     * from this store's own lowest-score entries, once (else a full disk stored nothing new ever again, the
     * old entries kept however little they were worth) */
    int fr = posix_fallocate(fd, 0, (off_t)fsize);
    if (fr == ENOSPC) {
        /* Only as much as is missing, and only when this store's other files can free it: a disk filled by
         * something else would otherwise lose every good entry on each save and still store nothing. */
        struct statvfs vs;
        if (ftruncate(fd, 0) == 0 && fstatvfs(fd, &vs) == 0) { /* a partial reservation freed first */
            const uint64_t avail = (uint64_t)vs.f_bavail * (uint64_t)vs.f_frsize;
            uint64_t need = fsize > avail ? fsize - avail : 0;
            if (need) need += fsize / 64 + (64u << 10); /* blocks and metadata beyond the byte count */
            pthread_mutex_lock(&kv->mu);
            uint64_t others = kv->total;
            int self = find_ent(kv, name);
            if (self >= 0) others -= kv->ents[self].e.file_bytes;
            const uint64_t before = kv->total;
            if (others >= need)
                evict_down_to(kv, name, kv->total - need, "to make room on a full disk");
            else
                logf_kv(kv, "kvstore: disk full: %llu bytes needed, %llu free, this store's other files hold %llu: "
                        "nothing evicted", (unsigned long long)fsize, (unsigned long long)avail,
                        (unsigned long long)others);
            const bool freed = kv->total < before;
            pthread_mutex_unlock(&kv->mu);
            if (freed) fr = posix_fallocate(fd, 0, (off_t)fsize);
        }
    }
    if (fr == ENOSPC || fr == EFBIG) {
        errno = fr;
        goto write_failed;
    }
    if (write_full(fd, raw, HDR_BYTES) || write_full(fd, tok_le, tok_bytes) ||
        write_full(fd, a->key_text, a->key_text_bytes) ||
        write_full(fd, a->payload, a->payload_bytes) ||
        write_full(fd, a->trailer, a->trailer_bytes) || fsync(fd) != 0)
        goto write_failed;
    if (close(fd) != 0) {
        fd = -1;
        goto write_failed;
    }
    fd = -1;

    pthread_mutex_lock(&kv->mu);
    if (rename(tmp, path) != 0) {
        int e = errno;
        pthread_mutex_unlock(&kv->mu);
        rc = ds4_err_set(err, DS4_E_IO, "kvstore: rename %s -> %s: %s", tmp, path, strerror(e));
        goto out;
    }
    fsync_dir(kv->dir); /* the rename is durable; a failure here loses only this entry */
    ds4_kvstore_entry e;
    fill_entry(&e, name, &h, fsize);
    if (add_ent(kv, &e, tok_copy, key_copy)) {
        /* Keep the index honest: without an entry the file must not stay. */
        unlink(path);
        pthread_mutex_unlock(&kv->mu);
        rc = ds4_err_set(err, DS4_E_NOMEM, "kvstore: out of memory");
        goto out;
    }
    tok_copy = NULL;
    key_copy = NULL;
    evict_locked(kv, name);
    pthread_mutex_unlock(&kv->mu);
    if (name_out) snprintf(name_out, DS4_KV_NAME_MAX, "%s", name);
    goto out;

write_failed: {
        int e = errno;
        rc = ds4_err_set(err, DS4_E_IO, "kvstore: writing %s (%llu bytes): %s%s", path,
                         (unsigned long long)fsize, strerror(e),
                         e == ENOSPC ? " (disk full; nothing was stored)" : "");
    }
out:
    if (fd >= 0) close(fd);
    if (rc && tmp) unlink(tmp);
    free(tmp);
    free(path);
    free(tok_le);
    free(tok_copy);
    free(key_copy);
    return rc;
}

/* ---- lookups ----------------------------------------------------------------- */

static int pass_filter(const ds4_kvstore_entry *e, const ds4_kvstore_filter *f) {
    if (!f) return 1;
    if (f->max_ctx && (e->ctx_size > f->max_ctx || e->n_tokens >= f->max_ctx)) return 0;
    if (f->min_tokens && e->n_tokens < f->min_tokens) return 0;
    if (f->quant_bits && e->quant_bits != f->quant_bits) return 0;
    return 1;
}

int ds4_kvstore_has(ds4_kvstore *kv, const int32_t *tokens, uint32_t n, const char *key_text, size_t key_text_bytes,
                    ds4_kvstore_entry *out) {
    if (!tokens || n == 0 || n > (UINT32_MAX - HDR_BYTES) / 4) return 0;
    uint8_t *tok_le = malloc(4 * (size_t)n);
    if (!tok_le) return 0;
    tokens_to_le(tokens, n, tok_le);
    char name[DS4_KV_NAME_MAX];
    int found = 0;
    if (!make_name(kv->fp, tok_le, n, key_text, key_text_bytes, name)) {
        pthread_mutex_lock(&kv->mu);
        int i = find_ent(kv, name);
        if (i >= 0) {
            /* the file itself, not only the index: a file deleted behind
             * our back must be written again (the entry goes) */
            char *path = join_path(kv->dir, name);
            struct stat st;
            if (path && lstat(path, &st) != 0 && (errno == ENOENT || errno == ENOTDIR || errno == ELOOP)) {
                drop_ent(kv, i);
            } else {
                found = 1;
                if (out) *out = kv->ents[i].e;
            }
            free(path);
        }
        pthread_mutex_unlock(&kv->mu);
    }
    free(tok_le);
    return found;
}

int ds4_kvstore_find_tokens(ds4_kvstore *kv, const int32_t *tokens, size_t n,
                            const ds4_kvstore_filter *f, ds4_kvstore_entry *out) {
    pthread_mutex_lock(&kv->mu);
    int best = -1;
    for (int i = 0; i < kv->n_ents; i++) {
        const kv_ent *k = &kv->ents[i];
        if (k->e.n_tokens > n || !pass_filter(&k->e, f)) continue;
        if (memcmp(k->tokens, tokens, 4 * (size_t)k->e.n_tokens)) continue;
        const ds4_kvstore_entry *b = best >= 0 ? &kv->ents[best].e : NULL;
        if (!b || k->e.n_tokens > b->n_tokens ||
            (k->e.n_tokens == b->n_tokens && k->e.last_used > b->last_used))
            best = i;
    }
    if (best >= 0 && out) *out = kv->ents[best].e;
    pthread_mutex_unlock(&kv->mu);
    return best >= 0;
}

int ds4_kvstore_find_text(ds4_kvstore *kv, const char *text, size_t len,
                          const ds4_kvstore_filter *f, ds4_kvstore_entry *out) {
    pthread_mutex_lock(&kv->mu);
    int best = -1;
    for (int i = 0; i < kv->n_ents; i++) {
        const kv_ent *k = &kv->ents[i];
        if (!k->e.key_text_bytes || k->e.key_text_bytes > len || !pass_filter(&k->e, f)) continue;
        if (memcmp(k->key, text, k->e.key_text_bytes)) continue;
        const ds4_kvstore_entry *b = best >= 0 ? &kv->ents[best].e : NULL;
        if (!b || k->e.key_text_bytes > b->key_text_bytes ||
            (k->e.key_text_bytes == b->key_text_bytes && k->e.n_tokens > b->n_tokens))
            best = i;
    }
    if (best >= 0 && out) *out = kv->ents[best].e;
    pthread_mutex_unlock(&kv->mu);
    return best >= 0;
}

/* ---- load -------------------------------------------------------------------- */

/* Opens `name` if it is in the index; DS4_E_ARG when not. */
static int open_indexed(ds4_kvstore *kv, const char *name, int flags, ds4_err *err) {
    pthread_mutex_lock(&kv->mu);
    int i = find_ent(kv, name);
    pthread_mutex_unlock(&kv->mu);
    if (i < 0) return ds4_err_set(err, DS4_E_ARG, "kvstore: %s is not in the cache", name);
    char *path = join_path(kv->dir, name);
    if (!path) return ds4_err_set(err, DS4_E_NOMEM, "kvstore: out of memory");
    ds4_err e2 = {0};
    int fd = ds4_open_regular(path, flags, NULL, &e2);
    if (fd < 0 && errno != EINVAL && flags != O_RDONLY)
        fd = ds4_open_regular(path, O_RDONLY, NULL, &e2);
    if (fd < 0) {
        int e = errno;
        pthread_mutex_lock(&kv->mu);
        /* deleted behind our back, or replaced by something that is not a
         * file (never ours to delete): no longer an entry */
        if (e == ENOENT || e == EINVAL || e == ELOOP || e == ENOTDIR) {
            int i2 = find_ent(kv, name);
            if (i2 >= 0) drop_ent(kv, i2);
        }
        pthread_mutex_unlock(&kv->mu);
        ds4_err_set(err, DS4_E_IO, "kvstore: %s", e2.msg);
        free(path);
        return DS4_E_IO;
    }
    free(path);
    return fd;
}

/* A file failed validation: remove it (if it is still the one open as fd). */
static int reject(ds4_kvstore *kv, const char *name, int fd, int rc, ds4_err *err) {
    if (rc == DS4_E_FORMAT) {
        pthread_mutex_lock(&kv->mu);
        int e = remove_file_locked(kv, name, fd);
        pthread_mutex_unlock(&kv->mu);
        if (e) ds4_err_prefix(err, "kvstore: rejected, but cannot remove it (%s)", strerror(e));
        else ds4_err_prefix(err, "kvstore: rejected and removed");
    }
    close(fd);
    return rc;
}

int ds4_kvstore_load(ds4_kvstore *kv, const char *name, ds4_kvstore_item *item, ds4_err *err) {
    memset(item, 0, sizeof *item);
    int fd = open_indexed(kv, name, O_RDWR, err);
    if (fd < 0) return fd;
    hdr h;
    uint8_t raw[HDR_BYTES], d[32];
    uint64_t fsize;
    int rc = read_meta(fd, name, &h, raw, &item->tokens, &item->key_text, &fsize, err);
    if (rc == 0 && memcmp(h.fp, kv->fp, 32))
        rc = ds4_err_set(err, DS4_E_FORMAT, "%s: written for another model (fingerprint differs)", name);
    uint64_t off = HDR_BYTES + 4 * (uint64_t)h.n_tokens + h.key_bytes;
    if (rc == 0 && (h.payload_bytes > SIZE_MAX || h.trailer_bytes > SIZE_MAX))
        rc = ds4_err_set(err, DS4_E_FORMAT, "%s: payload too large for this machine", name);
    if (rc == 0) {
        item->payload = malloc(h.payload_bytes ? (size_t)h.payload_bytes : 1);
        item->trailer = h.trailer_bytes ? malloc((size_t)h.trailer_bytes) : NULL;
        if (!item->payload || (h.trailer_bytes && !item->trailer))
            rc = ds4_err_set(err, DS4_E_NOMEM, "%s: out of memory for a payload of %llu bytes",
                             name, (unsigned long long)h.payload_bytes);
    }
    if (rc == 0 && (read_full(fd, item->payload, h.payload_bytes, off) ||
                    read_full(fd, item->trailer, h.trailer_bytes, off + h.payload_bytes)))
        rc = ds4_err_set(err, DS4_E_FORMAT, "%s: short read (truncated file)", name);
    if (rc == 0 && (sha256(item->payload, h.payload_bytes, d) || memcmp(d, h.payload_sha, 32)))
        rc = ds4_err_set(err, DS4_E_FORMAT, "%s: payload digest mismatch (corrupt payload)", name);
    if (rc == 0 && (sha256(item->trailer, h.trailer_bytes, d) || memcmp(d, h.trailer_sha, 32)))
        rc = ds4_err_set(err, DS4_E_FORMAT, "%s: trailer digest mismatch (corrupt trailer)", name);
    if (rc) {
        ds4_kvstore_item_free(item);
        return reject(kv, name, fd, rc, err);
    }
    /* Bump the usage fields in place (not covered by digests; a torn write
     * can only skew eviction order). */
    h.hits++;
    h.last_used = (uint64_t)time(NULL);
    uint8_t b[12];
    put_u32(b, h.hits);
    put_u64(b + 4, h.last_used);
    if (pwrite(fd, b, 4, 12) != 4 || pwrite(fd, b + 4, 8, 32) != 8) { /* read-only: fine */ }
    close(fd);
    fill_entry(&item->meta, name, &h, fsize);
    pthread_mutex_lock(&kv->mu);
    int i = find_ent(kv, name);
    if (i >= 0) {
        kv->ents[i].e.hits = h.hits;
        kv->ents[i].e.last_used = h.last_used;
    }
    pthread_mutex_unlock(&kv->mu);
    return 0;
}

void ds4_kvstore_item_free(ds4_kvstore_item *item) {
    if (!item) return;
    free(item->tokens);
    free(item->key_text);
    free(item->payload);
    free(item->trailer);
    memset(item, 0, sizeof *item);
}

int ds4_kvstore_read_trailer(ds4_kvstore *kv, const char *name, void **out, size_t *out_bytes,
                             ds4_err *err) {
    *out = NULL;
    *out_bytes = 0;
    int fd = open_indexed(kv, name, O_RDONLY, err);
    if (fd < 0) return fd;
    hdr h;
    uint8_t raw[HDR_BYTES], d[32];
    int32_t *tok = NULL;
    char *key = NULL;
    uint64_t fsize;
    void *tr = NULL;
    int rc = read_meta(fd, name, &h, raw, &tok, &key, &fsize, err);
    free(tok);
    free(key);
    if (rc == 0 && h.trailer_bytes > SIZE_MAX)
        rc = ds4_err_set(err, DS4_E_FORMAT, "%s: trailer too large", name);
    if (rc == 0 && h.trailer_bytes) {
        tr = malloc((size_t)h.trailer_bytes);
        if (!tr) rc = ds4_err_set(err, DS4_E_NOMEM, "%s: out of memory", name);
        else if (read_full(fd, tr, h.trailer_bytes, fsize - h.trailer_bytes))
            rc = ds4_err_set(err, DS4_E_FORMAT, "%s: short read (truncated file)", name);
    }
    if (rc == 0 && (sha256(tr, h.trailer_bytes, d) || memcmp(d, h.trailer_sha, 32)))
        rc = ds4_err_set(err, DS4_E_FORMAT, "%s: trailer digest mismatch (corrupt trailer)", name);
    if (rc) {
        free(tr);
        return reject(kv, name, fd, rc, err);
    }
    close(fd);
    *out = tr;
    *out_bytes = (size_t)h.trailer_bytes;
    return 0;
}

/* ---- maintenance ------------------------------------------------------------- */

int ds4_kvstore_remove(ds4_kvstore *kv, const char *name, ds4_err *err) {
    pthread_mutex_lock(&kv->mu);
    int e = remove_file_locked(kv, name, -1);
    pthread_mutex_unlock(&kv->mu);
    if (e) return ds4_err_set(err, DS4_E_IO, "kvstore: cannot remove %s: %s", name, strerror(e));
    return 0;
}

static int cmp_entry_name(const void *a, const void *b) {
    return strcmp(((const ds4_kvstore_entry *)a)->name, ((const ds4_kvstore_entry *)b)->name);
}

int ds4_kvstore_list(ds4_kvstore *kv, ds4_kvstore_entry **out) {
    pthread_mutex_lock(&kv->mu);
    int n = kv->n_ents;
    ds4_kvstore_entry *v = malloc((size_t)(n ? n : 1) * sizeof *v);
    if (!v) {
        pthread_mutex_unlock(&kv->mu);
        *out = NULL;
        return DS4_E_NOMEM;
    }
    for (int i = 0; i < n; i++) v[i] = kv->ents[i].e;
    pthread_mutex_unlock(&kv->mu);
    qsort(v, (size_t)n, sizeof *v, cmp_entry_name);
    *out = v;
    return n;
}

uint64_t ds4_kvstore_total_bytes(ds4_kvstore *kv) {
    pthread_mutex_lock(&kv->mu);
    uint64_t t = kv->total;
    pthread_mutex_unlock(&kv->mu);
    return t;
}
