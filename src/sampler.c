/* sampler.c - D.3 sampling, D.4 rng, D.5 logprobs (see sampler.h).
 *
 * Bit-exactness notes: every probability is expf((l - l_max) / T) in float;
 * sums are sequential float additions in the order D.3 states (id order on
 * the default path, descending-logit order on the sorted paths). One
 * uniform is drawn only where a random choice is actually made.
 */
#include "sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

struct ds4_sampler {
    int n_vocab;
    float *p;       /* (n_vocab) probabilities / scratch values */
    int32_t *ids;   /* (n_vocab) candidate ids (heap or sort order) */
    int32_t *ids2;  /* (n_vocab) radix sort ping-pong buffer */
    uint32_t *key;  /* (n_vocab) radix keys */
    uint32_t *key2; /* (n_vocab) */
};

ds4_sampler_params ds4_sampler_defaults(void) {
    ds4_sampler_params p = {1.0f, 0, 1.0f, 0.05f, 0};
    return p;
}

ds4_sampler_params ds4_sampler_effective(const ds4_sampler_params *client, int thinking,
                                         int greedy_structure) {
    ds4_sampler_params p = *client;
    if (thinking) {
        uint64_t seed = p.seed;
        p = ds4_sampler_defaults();
        p.seed = seed;
    }
    if (greedy_structure) p.temperature = 0.0f;
    return p;
}

/* ------------------------------------------------------------------ rng */

void ds4_rng_seed(ds4_rng *r, uint64_t seed) { r->s = seed; }

uint64_t ds4_rng_entropy_seed(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t x = (uint64_t)time(NULL);
    x ^= (uint64_t)getpid() << 32;
    x ^= (uint64_t)ts.tv_nsec * 0x9E3779B97F4A7C15ull;
    x ^= (uint64_t)(uintptr_t)&ts;
    return x ? x : 1;
}

uint64_t ds4_rng_next(ds4_rng *r) {
    uint64_t s = r->s;
    if (s == 0) s = 0x9E3779B97F4A7C15ull;
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    r->s = s;
    return s * 0x2545F4914F6CDD1Dull;
}

float ds4_rng_uniform(ds4_rng *r) {
    return (float)((ds4_rng_next(r) >> 40) & 0xFFFFFFu) / 16777216.0f;
}

/* -------------------------------------------------------------- sampler */

ds4_sampler *ds4_sampler_new(int n_vocab, ds4_err *err) {
    if (n_vocab <= 0) {
        ds4_err_set(err, DS4_E_ARG, "sampler: n_vocab %d must be positive", n_vocab);
        return NULL;
    }
    ds4_sampler *s = calloc(1, sizeof *s);
    if (s) {
        s->n_vocab = n_vocab;
        s->p = malloc((size_t)n_vocab * sizeof *s->p);
        s->ids = malloc((size_t)n_vocab * sizeof *s->ids);
        s->ids2 = malloc((size_t)n_vocab * sizeof *s->ids2);
        s->key = malloc((size_t)n_vocab * sizeof *s->key);
        s->key2 = malloc((size_t)n_vocab * sizeof *s->key2);
    }
    if (!s || !s->p || !s->ids || !s->ids2 || !s->key || !s->key2) {
        ds4_sampler_free(s);
        ds4_err_set(err, DS4_E_NOMEM, "sampler: no memory for %d logits", n_vocab);
        return NULL;
    }
    return s;
}

void ds4_sampler_free(ds4_sampler *s) {
    if (!s) return;
    free(s->p);
    free(s->ids);
    free(s->ids2);
    free(s->key);
    free(s->key2);
    free(s);
}

int32_t ds4_argmax(const float *logits, int n_vocab) {
    int32_t best = -1;
    float bl = 0.0f;
    for (int i = 0; i < n_vocab; i++) {
        float l = logits[i];
        if (!isfinite(l)) continue;
        if (best < 0 || l > bl) {
            best = i;
            bl = l;
        }
    }
    return best < 0 ? 0 : best;
}

/* Candidate order: a before b when its logit is larger, or equal with a
 * lower id. */
static int better(const float *lg, int32_t a, int32_t b) {
    return lg[a] > lg[b] || (lg[a] == lg[b] && a < b);
}

/* Min-heap (worst candidate on top) of at most k ids. */
static void heap_down(const float *lg, int32_t *h, int n, int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && better(lg, h[w], h[l])) w = l;
        if (r < n && better(lg, h[w], h[r])) w = r;
        if (w == i) return;
        int32_t t = h[i];
        h[i] = h[w];
        h[w] = t;
        i = w;
    }
}

static void heap_up(const float *lg, int32_t *h, int i) {
    while (i > 0) {
        int parent = (i - 1) / 2;
        if (!better(lg, h[parent], h[i])) return;
        int32_t t = h[i];
        h[i] = h[parent];
        h[parent] = t;
        i = parent;
    }
}

/* The k best finite logits into ids[0..ret), best first (D.3 top_k step 1).
 * A later equal logit never displaces an earlier one. */
static int select_top_k(const float *lg, int n, int k, int32_t *ids) {
    int m = 0;
    for (int i = 0; i < n; i++) {
        if (!isfinite(lg[i])) continue;
        if (m < k) {
            ids[m] = i;
            heap_up(lg, ids, m);
            m++;
        } else if (better(lg, i, ids[0])) {
            ids[0] = i;
            heap_down(lg, ids, m, 0);
        }
    }
    /* heap sort: pop the worst to the end */
    for (int end = m - 1; end > 0; end--) {
        int32_t t = ids[0];
        ids[0] = ids[end];
        ids[end] = t;
        heap_down(lg, ids, end, 0);
    }
    return m;
}

/* All finite logits into s->ids[0..ret), by descending logit, ties by
 * lower id: a stable LSD radix sort (3 passes of 11 bits) on keys that
 * order floats descending. Linear time, no allocation. */
static int sort_all(ds4_sampler *s, const float *lg) {
    int m = 0;
    for (int i = 0; i < s->n_vocab; i++) {
        if (!isfinite(lg[i])) continue;
        uint32_t u;
        memcpy(&u, &lg[i], 4);
        u = (u & 0x80000000u) ? ~u : (u | 0x80000000u); /* ascending order */
        s->key[m] = ~u;                                   /* descending */
        s->ids[m] = i;
        m++;
    }
    uint32_t *k0 = s->key, *k1 = s->key2;
    int32_t *i0 = s->ids, *i1 = s->ids2;
    for (int shift = 0; shift < 33; shift += 11) {
        uint32_t cnt[2048] = {0};
        for (int j = 0; j < m; j++) cnt[(k0[j] >> shift) & 2047]++;
        uint32_t sum = 0;
        for (int b = 0; b < 2048; b++) {
            uint32_t c = cnt[b];
            cnt[b] = sum;
            sum += c;
        }
        for (int j = 0; j < m; j++) {
            uint32_t d = cnt[(k0[j] >> shift) & 2047]++;
            k1[d] = k0[j];
            i1[d] = i0[j];
        }
        uint32_t *kt = k0; k0 = k1; k1 = kt;
        int32_t *it = i0; i0 = i1; i1 = it;
    }
    /* three passes: the result is in the second buffers */
    memcpy(s->ids, i0, (size_t)m * sizeof *s->ids);
    return m;
}

/* D.3 steps 2-3 over candidates ids[0..m) sorted best first: p[j] the
 * tempered weights, *cum their sum over the kept candidates; returns how
 * many are kept (0: no usable weight, the caller takes ids[0]). */
static int nucleus(ds4_sampler *s, const float *lg, int m, float temp, float top_p, float min_p, float *cum_out) {
    int32_t *ids = s->ids;
    float *p = s->p;
    float lmax = lg[ids[0]];
    float sum = 0.0f;
    for (int j = 0; j < m; j++) {
        p[j] = expf((lg[ids[j]] - lmax) / temp);
        sum += p[j];
    }
    if (!(sum > 0.0f) || !isfinite(sum)) return 0;
    int n_inc = 0;
    float cum = 0.0f;
    for (int j = 0; j < m; j++) {
        if (j > 0 && p[j] / sum < min_p * p[0] / sum) break;
        cum += p[j];
        n_inc = j + 1;
        if (cum / sum >= top_p) break;
    }
    if (!(cum > 0.0f) || !isfinite(cum)) return 0;
    *cum_out = cum;
    return n_inc;
}

/* D.3 steps 2-4 over candidates ids[0..m) sorted best first. */
static int32_t sample_sorted(ds4_sampler *s, const float *lg, int m, float temp, float top_p,
                             float min_p, ds4_rng *rng) {
    float cum = 0.0f;
    const int n_inc = nucleus(s, lg, m, temp, top_p, min_p, &cum);
    if (!n_inc) return s->ids[0];
    float r = ds4_rng_uniform(rng) * cum;
    for (int j = 0; j < n_inc; j++) {
        r -= s->p[j];
        if (r <= 0.0f) return s->ids[j];
    }
    return s->ids[n_inc - 1];
}

/* The request's parameters as D.3 applies them: top_p outside (0, 1] is 1,
 * min_p below 0 is 0, top_k at most DS4_TOP_K_MAX and the vocabulary. */
static void norm_params(const ds4_sampler_params *prm, int n, float *top_p, float *min_p, int *top_k) {
    *top_p = prm->top_p;
    if (!(*top_p > 0.0f) || *top_p > 1.0f) *top_p = 1.0f;
    *min_p = prm->min_p > 0.0f ? prm->min_p : 0.0f;
    *top_k = prm->top_k;
    if (*top_k > DS4_TOP_K_MAX) *top_k = DS4_TOP_K_MAX;
    if (*top_k > n) *top_k = n;
}

int32_t ds4_sampler_sample(ds4_sampler *s, const float *lg, const ds4_sampler_params *prm,
                           ds4_rng *rng) {
    int n = s->n_vocab;
    float temp = prm->temperature;
    if (!(temp > 0.0f)) return ds4_argmax(lg, n);
    float top_p, min_p;
    int top_k;
    norm_params(prm, n, &top_p, &min_p, &top_k);

    if (top_k > 0) {
        int m = select_top_k(lg, n, top_k, s->ids);
        if (m == 0) return ds4_argmax(lg, n);
        return sample_sorted(s, lg, m, temp, top_p, min_p, rng);
    }
    if (top_p < 1.0f) {
        /* Full sort by descending logit. ds4 uses an unstable sort (order of
         * exact ties unspecified, docs/TEXT.md E.5); we break ties by lower id
         * with a stable radix sort (qsort could allocate). */
        int m = sort_all(s, lg);
        if (m == 0) return ds4_argmax(lg, n);
        return sample_sorted(s, lg, m, temp, top_p, min_p, rng);
    }

    /* Default path: one pass in id order, no sort. */
    int32_t best = ds4_argmax(lg, n);
    if (!isfinite(lg[best])) return best;
    float lmax = lg[best];
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        float q = -1.0f; /* -1 marks an excluded id */
        if (isfinite(lg[i])) {
            q = expf((lg[i] - lmax) / temp);
            if (q < min_p) q = -1.0f; /* relative min-p: p_max is 1 */
            else sum += q;
        }
        s->p[i] = q;
    }
    if (!(sum > 0.0f) || !isfinite(sum)) return best;
    float r = ds4_rng_uniform(rng) * sum;
    for (int i = 0; i < n; i++) {
        if (s->p[i] < 0.0f) continue;
        r -= s->p[i];
        if (r <= 0.0f) return i;
    }
    return best;
}

/* probs of the sorted paths: candidates ids[0..m), best first */
static void probs_sorted(ds4_sampler *s, const float *lg, int m, float temp, float top_p, float min_p,
                         float *probs) {
    float cum = 0.0f;
    const int n_inc = nucleus(s, lg, m, temp, top_p, min_p, &cum);
    if (!n_inc) {
        probs[s->ids[0]] = 1.0f;
        return;
    }
    for (int j = 0; j < n_inc; j++) probs[s->ids[j]] = s->p[j] / cum;
}

void ds4_sampler_probs(ds4_sampler *s, const float *lg, const ds4_sampler_params *prm, float *probs) {
    int n = s->n_vocab;
    memset(probs, 0, (size_t)n * sizeof(float));
    float temp = prm->temperature;
    if (!(temp > 0.0f)) {
        probs[ds4_argmax(lg, n)] = 1.0f;
        return;
    }
    float top_p, min_p;
    int top_k;
    norm_params(prm, n, &top_p, &min_p, &top_k);
    if (top_k > 0 || top_p < 1.0f) {
        int m = top_k > 0 ? select_top_k(lg, n, top_k, s->ids) : sort_all(s, lg);
        if (m == 0) {
            probs[ds4_argmax(lg, n)] = 1.0f;
            return;
        }
        probs_sorted(s, lg, m, temp, top_p, min_p, probs);
        return;
    }
    int32_t best = ds4_argmax(lg, n);
    if (!isfinite(lg[best])) {
        probs[best] = 1.0f;
        return;
    }
    float lmax = lg[best];
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        float q = 0.0f;
        if (isfinite(lg[i])) {
            q = expf((lg[i] - lmax) / temp);
            if (q < min_p) q = 0.0f;
            else sum += q;
        }
        probs[i] = q;
    }
    if (!(sum > 0.0f) || !isfinite(sum)) {
        memset(probs, 0, (size_t)n * sizeof(float));
        probs[best] = 1.0f;
        return;
    }
    for (int i = 0; i < n; i++) probs[i] /= sum;
}

int ds4_sampler_logprobs(ds4_sampler *s, const float *lg, int n_top, int32_t *top_ids,
                         double *top_lp, double *lp_all) {
    int n = s->n_vocab;
    if (n_top < 0 || (n_top > 0 && (!top_ids || !top_lp))) return DS4_E_ARG;
    double lmax = -INFINITY;
    for (int i = 0; i < n; i++)
        if (isfinite(lg[i]) && lg[i] > lmax) lmax = lg[i];
    double sum = 0.0;
    for (int i = 0; i < n; i++)
        if (isfinite(lg[i])) sum += exp((double)lg[i] - lmax);
    double lse = lmax + log(sum);
    if (lp_all)
        for (int i = 0; i < n; i++) lp_all[i] = isfinite(lg[i]) ? (double)lg[i] - lse : -INFINITY;
    if (n_top > n) n_top = n;
    int m = n_top > 0 ? select_top_k(lg, n, n_top, s->ids) : 0;
    for (int j = 0; j < m; j++) {
        top_ids[j] = s->ids[j];
        top_lp[j] = (double)lg[s->ids[j]] - lse;
    }
    return m;
}
