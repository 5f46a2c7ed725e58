/* test_sampler.c - sampling (docs/TEXT.md §D) on fixed logits.
 *
 * Where exact values are expected they come from an independent Python
 * reference of D.3/D.4 (numpy float32 arithmetic, written from the spec
 * text, run once; the same reference is also run against the library in
 * tests/py/test_sampler_numpy_ref.py on random cases). Filtering sets are
 * derived by hand from the softmax values noted next to each case.
 */
#include "test.h"

#include <math.h>
#include <stdlib.h>

#include "sampler.h"

DS4_TEST(sampler_rng_matches_xorshift64star_reference) {
    /* Python: x ^= x>>12; x ^= x<<25; x ^= x>>27; out = x*0x2545F4914F6CDD1D */
    ds4_rng r;
    ds4_rng_seed(&r, 42);
    CHECK(ds4_rng_next(&r) == 0x56ce4ab7719ba3a0ull);
    CHECK(ds4_rng_next(&r) == 0xc841eb53ebbb2ddaull);
    CHECK(ds4_rng_next(&r) == 0xca466be0c9980276ull);
    CHECK(ds4_rng_next(&r) == 0xf1acc7334a7b70dfull);
    /* state 0 is replaced by 0x9E3779B97F4A7C15 */
    ds4_rng_seed(&r, 0);
    CHECK(ds4_rng_next(&r) == 0x0d83b3e29a21487aull);
    CHECK(ds4_rng_next(&r) == 0x54c44c79f1fe9d67ull);
    CHECK(ds4_rng_next(&r) == 0xa845f342007a0e78ull);
    /* u = ((out >> 40) & 0xFFFFFF) / 2^24: 0x56ce4a / 2^24 = 0.33908522... */
    ds4_rng_seed(&r, 42);
    CHECK(ds4_rng_uniform(&r) == (float)0x56ce4a / 16777216.0f);
    CHECK_NEAR(ds4_rng_uniform(&r), 0.7822558283805847, 0);
    CHECK_NEAR(ds4_rng_uniform(&r), 0.790136992931366, 0);
    CHECK_NEAR(ds4_rng_uniform(&r), 0.9440426230430603, 0);
    /* reproducible */
    ds4_rng a, b;
    ds4_rng_seed(&a, 7);
    ds4_rng_seed(&b, 7);
    for (int i = 0; i < 1000; i++) CHECK(ds4_rng_next(&a) == ds4_rng_next(&b));
    for (int i = 0; i < 100000; i++) {
        float u = ds4_rng_uniform(&a);
        CHECK(u >= 0.0f && u < 1.0f);
    }
}

static const float LG[10] = {1.5f, -0.25f, 3.0f, 2.75f, 0.0f, -4.0f, 2.0f, 1.0f, -1.5f, 0.5f};

static void check_seq(ds4_test_ctx *t, ds4_sampler_params p, const int *want, int n) {
    ds4_sampler *s = ds4_sampler_new(10, NULL);
    ds4_rng r;
    ds4_rng_seed(&r, 1234);
    for (int i = 0; i < n; i++) {
        int32_t got = ds4_sampler_sample(s, LG, &p, &r);
        if (got != want[i]) {
            ds4_sampler_free(s);
            TEST_FAIL("draw %d: got %d, reference %d", i, got, want[i]);
        }
    }
    /* one uniform per draw: 24 draws leave the state the reference had */
    CHECK(r.s == 0xb26d46ada3b560d9ull);
    ds4_sampler_free(s);
}

DS4_TEST(sampler_seeded_streams_match_reference) {
    static const int def[24] = {3, 2, 2, 2, 7, 2, 2, 0, 2, 2, 2, 3, 2, 3, 3, 6, 6, 6, 2, 2, 2, 2, 3, 0};
    static const int topk[24] = {6, 2, 3, 2, 0, 2, 3, 2, 2, 3, 2, 3, 2, 6, 3, 0, 0, 0, 2, 2, 2, 2, 3, 2};
    static const int topp[24] = {3, 2, 2, 2, 0, 2, 3, 2, 2, 3, 2, 3, 2, 6, 3, 0, 0, 6, 2, 2, 2, 2, 3, 2};
    static const int all3[24] = {3, 2, 2, 2, 6, 2, 2, 2, 2, 2, 2, 3, 2, 3, 3, 6, 6, 6, 2, 2, 2, 2, 3, 2};
    check_seq(t, (ds4_sampler_params){0.7f, 0, 1.0f, 0.05f, 0}, def, 24);
    if (t->failed) return;
    check_seq(t, (ds4_sampler_params){1.3f, 4, 1.0f, 0.0f, 0}, topk, 24);
    if (t->failed) return;
    check_seq(t, (ds4_sampler_params){1.0f, 0, 0.8f, 0.02f, 0}, topp, 24);
    if (t->failed) return;
    check_seq(t, (ds4_sampler_params){0.9f, 6, 0.9f, 0.2f, 0}, all3, 24);
}

DS4_TEST(sampler_greedy_argmax_draws_nothing) {
    float l[6] = {1.0f, 5.0f, -INFINITY, 5.0f, NAN, 2.0f};
    ds4_sampler *s = ds4_sampler_new(6, NULL);
    ds4_rng r;
    ds4_rng_seed(&r, 99);
    ds4_sampler_params p = ds4_sampler_defaults();
    p.temperature = 0.0f;
    CHECK_EQ_INT(ds4_sampler_sample(s, l, &p, &r), 1); /* lower id on ties */
    p.temperature = -1.0f;
    CHECK_EQ_INT(ds4_sampler_sample(s, l, &p, &r), 1);
    CHECK(r.s == 99);
    CHECK_EQ_INT(ds4_argmax(l, 6), 1);
    float inf[3] = {1.0f, INFINITY, 2.0f}; /* non-finite logits are skipped */
    CHECK_EQ_INT(ds4_argmax(inf, 3), 2);
    float none[2] = {NAN, -INFINITY};
    CHECK_EQ_INT(ds4_argmax(none, 2), 0);
    p.temperature = 1.0f;
    ds4_sampler *s2 = ds4_sampler_new(2, NULL);
    CHECK_EQ_INT(ds4_sampler_sample(s2, none, &p, &r), 0);
    CHECK(r.s == 99); /* degenerate: no draw */
    ds4_sampler_free(s);
    ds4_sampler_free(s2);
}

/* Support of n draws as a bit mask. */
static unsigned support(const float *l, int nv, ds4_sampler_params p, int n) {
    ds4_sampler *s = ds4_sampler_new(nv, NULL);
    ds4_rng r;
    ds4_rng_seed(&r, 2024);
    unsigned m = 0;
    for (int i = 0; i < n; i++) m |= 1u << ds4_sampler_sample(s, l, &p, &r);
    ds4_sampler_free(s);
    return m;
}

DS4_TEST(sampler_filter_sets) {
    /* T=1 softmax of F: .5609 .2063 .1251 .0759 .0279 .0038; relative to the
     * top: 1 .3679 .2231 .1353 .0498 .0067 */
    static const float F[6] = {2.0f, 1.0f, 0.5f, 0.0f, -1.0f, -3.0f};
    ds4_sampler_params p = {1.0f, 0, 1.0f, 0.0f, 0};
    CHECK_EQ_INT(support(F, 6, p, 20000), 0x3f);
    p.min_p = 0.1f; /* drops .0498 and .0067 */
    CHECK_EQ_INT(support(F, 6, p, 5000), 0x0f);
    p.min_p = 0.05f; /* .0498 < .05 */
    CHECK_EQ_INT(support(F, 6, p, 5000), 0x0f);
    p.min_p = 0.04f;
    CHECK_EQ_INT(support(F, 6, p, 5000), 0x1f);
    p.min_p = 0.0f;
    p.top_k = 2;
    CHECK_EQ_INT(support(F, 6, p, 5000), 0x03);
    p.top_k = 0;
    p.top_p = 0.7f; /* .5609 < .7, then .7672 >= .7 */
    CHECK_EQ_INT(support(F, 6, p, 5000), 0x03);
    p.top_p = 0.8f; /* .7672 < .8, then .8923 */
    CHECK_EQ_INT(support(F, 6, p, 5000), 0x07);
    p = (ds4_sampler_params){1.0f, 5, 0.95f, 0.1f, 0}; /* min_p cuts id 4 first */
    CHECK_EQ_INT(support(F, 6, p, 5000), 0x0f);
    p.top_p = 0.85f;
    CHECK_EQ_INT(support(F, 6, p, 5000), 0x07);
    /* temperature 0.5: relative 1 .1353 .0498 .0183 ...; min_p .05 keeps 2 */
    p = (ds4_sampler_params){0.5f, 0, 1.0f, 0.05f, 0};
    CHECK_EQ_INT(support(F, 6, p, 5000), 0x03);
    /* out-of-range knobs: top_p > 1 or <= 0 means 1, min_p < 0 means 0, top_k > vocab caps */
    p = (ds4_sampler_params){1.0f, 5000, 7.0f, -1.0f, 0};
    CHECK_EQ_INT(support(F, 6, p, 20000), 0x3f);
    p.top_p = 0.0f;
    CHECK_EQ_INT(support(F, 6, p, 20000), 0x3f);
    /* top_k ties: equal logits admitted in id order */
    static const float T5[5] = {1.0f, 3.0f, 3.0f, 3.0f, 0.0f};
    p = (ds4_sampler_params){1.0f, 2, 1.0f, 0.0f, 0};
    CHECK_EQ_INT(support(T5, 5, p, 5000), 0x06);
    /* non-finite logits never sampled */
    static const float NF[4] = {0.0f, -INFINITY, NAN, 0.5f};
    p = (ds4_sampler_params){1.0f, 0, 1.0f, 0.0f, 0};
    CHECK_EQ_INT(support(NF, 4, p, 5000), 0x09);
    p.top_k = 4;
    CHECK_EQ_INT(support(NF, 4, p, 5000), 0x09);
    p.top_k = 0, p.top_p = 0.99f;
    CHECK_EQ_INT(support(NF, 4, p, 5000), 0x09);
}

/* Pearson chi-square of n draws against softmax(l / T) restricted to the
 * ids in `keep` (mask). */
static double chi2(const float *l, int nv, ds4_sampler_params p, unsigned keep, int n, int *df) {
    double e[16], z = 0;
    for (int i = 0; i < nv; i++) {
        e[i] = (keep >> i & 1) ? exp((double)l[i] / p.temperature) : 0.0;
        z += e[i];
    }
    int cnt[16] = {0};
    ds4_sampler *s = ds4_sampler_new(nv, NULL);
    ds4_rng r;
    ds4_rng_seed(&r, 77);
    for (int k = 0; k < n; k++) cnt[ds4_sampler_sample(s, l, &p, &r)]++;
    ds4_sampler_free(s);
    double x = 0;
    *df = -1;
    for (int i = 0; i < nv; i++) {
        if (!(keep >> i & 1)) {
            if (cnt[i]) return 1e9;
            continue;
        }
        double ex = n * e[i] / z;
        x += (cnt[i] - ex) * (cnt[i] - ex) / ex;
        (*df)++;
    }
    return x;
}

DS4_TEST(sampler_distribution_chi_square) {
    static const float L8[8] = {0.3f, 1.2f, -0.4f, 0.9f, 0.0f, 1.5f, -1.0f, 0.6f};
    int df;
    /* 99.9% quantiles: df 7 -> 24.32, df 3 -> 16.27, df 2 -> 13.82 */
    double x = chi2(L8, 8, (ds4_sampler_params){1.0f, 0, 1.0f, 0.0f, 0}, 0xff, 100000, &df);
    CHECK_EQ_INT(df, 7);
    CHECK_MSG(x < 24.32, "chi2 %.2f (T=1, full)", x);
    x = chi2(L8, 8, (ds4_sampler_params){0.6f, 0, 1.0f, 0.0f, 0}, 0xff, 100000, &df);
    CHECK_MSG(x < 24.32, "chi2 %.2f (T=0.6)", x);
    x = chi2(L8, 8, (ds4_sampler_params){1.0f, 4, 1.0f, 0.0f, 0}, 0x2a | 0x80, 100000, &df);
    CHECK_EQ_INT(df, 3); /* top 4: ids 5 (1.5), 1 (1.2), 3 (.9), 7 (.6) */
    CHECK_MSG(x < 16.27, "chi2 %.2f (top_k 4)", x);
    /* nucleus 0.5: softmax .0872 .2146 .0433 .1590 .0646 .2897 .0238 .1178;
     * sorted .2897 (id 5) + .2146 (id 1) = .5043 >= .5 */
    x = chi2(L8, 8, (ds4_sampler_params){1.0f, 0, 0.5f, 0.0f, 0}, 0x22, 100000, &df);
    CHECK_EQ_INT(df, 1);
    CHECK_MSG(x < 10.83, "chi2 %.2f (top_p .5)", x);
}

DS4_TEST(sampler_logprobs_are_log_softmax) {
    static const float L[7] = {0.5f, 2.0f, 2.0f, -1.0f, 2.0f, -INFINITY, 30.0f};
    ds4_sampler *s = ds4_sampler_new(7, NULL);
    double all[7], tlp[4];
    int32_t tid[4];
    int m = ds4_sampler_logprobs(s, L, 4, tid, tlp, all);
    CHECK_EQ_INT(m, 4);
    long double z = 0;
    for (int i = 0; i < 7; i++)
        if (isfinite(L[i])) z += expl((long double)L[i] - 30.0L);
    double lse = (double)(30.0L + logl(z));
    for (int i = 0; i < 7; i++) {
        if (!isfinite(L[i])) {
            CHECK(isinf(all[i]) && all[i] < 0);
            continue;
        }
        CHECK_NEAR(all[i], (double)L[i] - lse, 1e-12);
    }
    CHECK_EQ_INT(tid[0], 6);
    CHECK_EQ_INT(tid[1], 1); /* ties: lower id first */
    CHECK_EQ_INT(tid[2], 2);
    CHECK_EQ_INT(tid[3], 4);
    for (int j = 0; j < 4; j++) CHECK(tlp[j] == all[tid[j]]);
    /* more asked than finite logits */
    int32_t ids7[7];
    double lp7[7];
    CHECK_EQ_INT(ds4_sampler_logprobs(s, L, 7, ids7, lp7, NULL), 6);
    CHECK_EQ_INT(ids7[5], 3);
    double sum = 0;
    for (int j = 0; j < 6; j++) sum += exp(lp7[j]);
    CHECK_NEAR(sum, 1.0, 1e-12);
    CHECK_EQ_INT(ds4_sampler_logprobs(s, L, 0, NULL, NULL, NULL), 0);
    CHECK_EQ_INT(ds4_sampler_logprobs(s, L, 2, NULL, NULL, NULL), DS4_E_ARG);
    ds4_sampler_free(s);
}

DS4_TEST(sampler_precedence_and_args) {
    ds4_sampler_params c = {0.2f, 40, 0.5f, 0.3f, 9};
    ds4_sampler_params e = ds4_sampler_effective(&c, 0, 0);
    CHECK(e.temperature == 0.2f && e.top_k == 40 && e.top_p == 0.5f && e.min_p == 0.3f);
    e = ds4_sampler_effective(&c, 1, 0); /* thinking: client knobs ignored */
    CHECK(e.temperature == 1.0f && e.top_k == 0 && e.top_p == 1.0f && e.min_p == 0.05f && e.seed == 9);
    e = ds4_sampler_effective(&c, 1, 1); /* DSML structure: greedy */
    CHECK(e.temperature == 0.0f);
    e = ds4_sampler_effective(&c, 0, 1);
    CHECK(e.temperature == 0.0f && e.top_k == 40);
    ds4_err err = {0};
    CHECK(ds4_sampler_new(0, &err) == NULL);
    CHECK_EQ_INT(err.code, DS4_E_ARG);
    CHECK(ds4_rng_entropy_seed() != 0);
}

DS4_TEST(sampler_full_vocab_speed_and_top_k_cap) {
    /* 129280 logits, top_k 5000 capped to 1024: the sample is among the
     * 1024 best */
    int nv = 129280;
    float *l = malloc((size_t)nv * sizeof *l);
    ds4_rng r;
    ds4_rng_seed(&r, 5);
    for (int i = 0; i < nv; i++) l[i] = ds4_rng_uniform(&r) * 20.0f;
    ds4_sampler *s = ds4_sampler_new(nv, NULL);
    ds4_sampler_params p = {1.0f, 5000, 1.0f, 0.0f, 0};
    int32_t *ids = malloc(1024 * sizeof *ids);
    double *lp = malloc(1024 * sizeof *lp);
    CHECK_EQ_INT(ds4_sampler_logprobs(s, l, 1024, ids, lp, NULL), 1024);
    float kth = l[ids[1023]];
    for (int k = 0; k < 200; k++) {
        int32_t tok = ds4_sampler_sample(s, l, &p, &r);
        CHECK(l[tok] >= kth);
    }
    p.top_k = 0;
    p.top_p = 0.9f;
    for (int k = 0; k < 5; k++) {
        int32_t tok = ds4_sampler_sample(s, l, &p, &r);
        CHECK(tok >= 0 && tok < nv);
    }
    free(ids);
    free(lp);
    free(l);
    ds4_sampler_free(s);
}
