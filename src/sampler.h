/* sampler.h - token sampling and log-probabilities (docs/TEXT.md §D).
 *
 * ds4_sampler_sample implements D.3 exactly (float32, expf, sequential sums
 * in the documented orders) with the xorshift64* generator of D.4, so a
 * seeded stream reproduces ds4's. Scratch memory (n_vocab floats and ids)
 * is allocated once by ds4_sampler_new: sampling allocates nothing and is
 * safe on the decode path. A sampler is single-owner (not thread-safe);
 * use one per worker. The rng is a plain value owned by the caller (one per
 * request/turn).
 */
#ifndef DS4_SAMPLER_H
#define DS4_SAMPLER_H

#include <stddef.h>
#include <stdint.h>

#include "util/err.h"

#define DS4_TOP_K_MAX 1024

typedef struct ds4_sampler_params {
    float temperature; /* <= 0: greedy (argmax). Default 1.0 */
    int top_k;         /* 0 off; capped at 1024 and n_vocab. Default 0 */
    float top_p;       /* <= 0 or > 1 mean 1. Default 1.0 */
    float min_p;       /* relative to the top token; < 0 means 0. Default 0.05 */
    uint64_t seed;     /* 0: none (caller seeds from time); else the rng seed */
} ds4_sampler_params;

/* D.1 defaults: temperature 1, top_k 0, top_p 1, min_p 0.05, seed 0. */
ds4_sampler_params ds4_sampler_defaults(void);

/* D.2 precedence (server): thinking (mode high/max) replaces the client's
 * values by the defaults (seed kept); greedy_structure (a C.9 STRUCTURAL or
 * JSON_STRUCTURAL position) then forces temperature 0. */
ds4_sampler_params ds4_sampler_effective(const ds4_sampler_params *client, int thinking,
                                         int greedy_structure);

/* xorshift64* (D.4). */
typedef struct ds4_rng {
    uint64_t s;
} ds4_rng;

/* State = seed (0 is replaced by 0x9E3779B97F4A7C15 at the first draw). */
void ds4_rng_seed(ds4_rng *r, uint64_t seed);
/* A seed from the clock, pid and an address: for requests without a seed. */
uint64_t ds4_rng_entropy_seed(void);
uint64_t ds4_rng_next(ds4_rng *r);
/* ((next >> 40) & 0xFFFFFF) / 2^24, in [0, 1). */
float ds4_rng_uniform(ds4_rng *r);

typedef struct ds4_sampler ds4_sampler;

/* Scratch for logits of width n_vocab. NULL + DS4_E_NOMEM/ARG in err. */
ds4_sampler *ds4_sampler_new(int n_vocab, ds4_err *err);
void ds4_sampler_free(ds4_sampler *s);

/* Samples one token from logits (n_vocab values) per D.3. Draws exactly one
 * uniform from rng when a random choice is made; greedy and degenerate
 * cases draw nothing. Returns the token id (0..n_vocab-1). */
int32_t ds4_sampler_sample(ds4_sampler *s, const float *logits,
                           const ds4_sampler_params *p, ds4_rng *rng);

/* The distribution ds4_sampler_sample draws from for these logits and
 * params, as dense probabilities probs[0..n_vocab) (zeros outside the
 * candidates; one-hot at the greedy token for temperature <= 0 and for the
 * degenerate cases where sampling returns a fixed token). Same candidate
 * rules and float arithmetic as sampling; draws nothing. */
void ds4_sampler_probs(ds4_sampler *s, const float *logits, const ds4_sampler_params *p, float *probs);

/* Lowest id among the maximal finite logits (strict > scan); 0 if none is
 * finite. */
int32_t ds4_argmax(const float *logits, int n_vocab);

/* Log-probabilities (D.5), double precision over finite logits:
 * lp_i = l_i - (l_max + ln sum_j exp(l_j - l_max)). Writes the n_top
 * highest (descending logit, lower id first on ties) into top_ids/top_lp
 * (either may be NULL when n_top is 0) and returns how many were written
 * (<= n_top, fewer when fewer logits are finite). If lp_all is non-NULL it
 * gets every token's logprob (-INFINITY for non-finite logits). Uses the
 * sampler's scratch; no allocation. Returns a negative code on bad args. */
int ds4_sampler_logprobs(ds4_sampler *s, const float *logits, int n_top, int32_t *top_ids,
                         double *top_lp, double *lp_all);

#endif
