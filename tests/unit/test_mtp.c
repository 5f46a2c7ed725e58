/* test_mtp.c - MTP speculative decoding on tiny random models (MODEL.md
 * C.12, issue 10): the MTP GGUF is validated like the main file; greedy
 * output with speculation equals greedy output without it, with the random
 * MTP block and with test drafters that are always right or always wrong;
 * the state after rejected drafts equals a session that never drafted
 * (serialized caches and frontiers compared byte for byte); sampling with
 * speculation draws each token from the model's distribution (seeded
 * chi-square test on a 64-token vocabulary). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ds4.h"
#include "ds4_debug.h"
#include "model.h"
#include "quant.h"
#include "sampler.h"
#include "test.h"
#include "test_model_build.h"

static tm_cfg cfg_q8(void) {
    tm_cfg c = tm_default();
    c.type_mat = DS4_TYPE_Q8_0; /* int8 activations on the release path */
    return c;
}

/* Builds main + MTP files for c; opens them (mtp_cfg NULL: no MTP). */
static int open_pair(const tm_cfg *c, const tm_cfg *mtp_cfg, const char *name, bool plain, ds4_engine **e,
                     ds4_err *err) {
    char path[512], mpath[512];
    snprintf(path, sizeof path, "%s/%s.gguf", ds4_test_tmpdir(), name);
    snprintf(mpath, sizeof mpath, "%s/%s-mtp.gguf", ds4_test_tmpdir(), name);
    if (tm_build(c, path) != 0) return -1;
    if (mtp_cfg && tm_build_mtp(mtp_cfg, mpath) != 0) return -1;
    ds4_engine_opts o = {.model_path = path, .mtp_path = mtp_cfg ? mpath : NULL, .backend = DS4_BACKEND_CPU,
                         .n_threads = 2, .plain_numerics = plain};
    *e = NULL;
    return ds4_engine_open(e, &o, err);
}

static void tokens(int32_t *ids, int n, int V, unsigned seed) {
    for (int i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        ids[i] = (int32_t)((seed >> 8) % (unsigned)V);
    }
}

static ds4_session *new_session(ds4_engine *e, int n_ctx) {
    ds4_session_opts so = {.n_ctx = n_ctx};
    ds4_session *s = NULL;
    ds4_err err = {0};
    if (ds4_session_new(e, &so, &s, &err)) fprintf(stderr, "session: %s\n", err.msg);
    return s;
}

/* Greedy continuation of n tokens by plain decode steps. */
static int greedy_plain(ds4_engine *e, const int32_t *prompt, int np, int32_t *out, int n) {
    ds4_session *s = new_session(e, 256);
    ds4_err err = {0};
    int rc = s ? ds4_session_sync(s, prompt, np, NULL, NULL, NULL, &err) : -1;
    for (int i = 0; !rc && i < n; i++) {
        rc = ds4_session_argmax(s, &out[i], &err);
        if (!rc) rc = ds4_session_eval(s, out[i], &err);
    }
    if (rc && s) fprintf(stderr, "greedy: %s\n", err.msg);
    ds4_session_free(s);
    return rc;
}

/* Greedy continuation of n tokens by speculative cycles; *st the stats. */
static int greedy_spec(ds4_session *s, const int32_t *prompt, int np, int32_t *out, int n, ds4_spec_stats *st,
                       bool check_state, ds4_engine *e, int *state_mismatch) {
    ds4_err err = {0};
    ds4_sampler_params p = ds4_sampler_defaults();
    p.temperature = 0;
    ds4_rng rng;
    ds4_rng_seed(&rng, 1);
    int rc = ds4_session_sync(s, prompt, np, NULL, NULL, NULL, &err);
    int32_t next = 0;
    if (!rc) rc = ds4_session_argmax(s, &next, &err);
    int got = 0;
    ds4_session *ref = check_state ? new_session(e, 256) : NULL;
    while (!rc && got < n) {
        int32_t o[8];
        int no = 0;
        rc = ds4_session_spec_step(s, next, n - got, &p, &rng, o, &no, &next, &err);
        for (int i = 0; !rc && i < no; i++) out[got++] = o[i];
        if (!rc && ref) {
            /* a session that never drafted, holding the same tokens */
            void *a = NULL, *b = NULL;
            size_t na = 0, nb = 0;
            rc = ds4_session_sync(ref, ds4_session_tokens(s), ds4_session_n_tokens(s), NULL, NULL, NULL, &err);
            if (!rc) rc = ds4_session_save(s, &a, &na, &err);
            if (!rc) rc = ds4_session_save(ref, &b, &nb, &err);
            if (!rc && (na != nb || memcmp(a, b, na) != 0)) (*state_mismatch)++;
            free(a);
            free(b);
        }
    }
    if (rc) fprintf(stderr, "spec: %s\n", err.msg);
    ds4_session_spec_stats(s, st);
    ds4_session_free(ref);
    return rc;
}

DS4_TEST(mtp_file_is_validated) {
    tm_cfg c = tm_default();
    ds4_engine *e = NULL;
    ds4_err err = {0};
    int rc = open_pair(&c, &c, "mtp_ok", true, &e, &err);
    CHECK_MSG(rc == 0, "%s", err.msg);
    CHECK(ds4_engine_has_mtp(e));
    ds4_engine_close(e);
    struct {
        const char *skip, *shape, *type;
        const char *want;
    } cases[] = {
        {"mtp.0.exp_probs_b.bias", NULL, NULL, "mtp.0.exp_probs_b.bias"},
        {"mtp.0.hc_head_fn.weight", NULL, NULL, "mtp.0.hc_head_fn.weight"},
        {NULL, "mtp.0.e_proj.weight", NULL, "mtp.0.e_proj.weight"},
        {NULL, "mtp.0.ffn_down_exps.weight", NULL, "mtp.0.ffn_down_exps.weight"},
        {NULL, NULL, "mtp.0.attn_q_b.weight", "mtp.0.attn_q_b.weight"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        tm_cfg d = c;
        d.skip_tensor = cases[i].skip;
        d.bad_shape_tensor = cases[i].shape;
        d.bad_type_tensor = cases[i].type;
        err = (ds4_err){0};
        rc = open_pair(&c, &d, "mtp_bad", true, &e, &err);
        CHECK_MSG(rc != 0 && !e, "damaged MTP file (%s) was accepted", cases[i].want);
        CHECK_MSG(strstr(err.msg, cases[i].want) != NULL, "error '%s' does not name %s", err.msg, cases[i].want);
    }
    /* an MTP block of another model (hidden 32 instead of 64) */
    tm_cfg o = c;
    o.D = 32;
    err = (ds4_err){0};
    rc = open_pair(&c, &o, "mtp_other", true, &e, &err);
    CHECK_MSG(rc != 0 && strstr(err.msg, "mtp.0.") && strstr(err.msg, "shape"), "mismatched MTP: '%s'", err.msg);
    /* truncated file */
    char mpath[512];
    snprintf(mpath, sizeof mpath, "%s/mtp_ok-mtp.gguf", ds4_test_tmpdir());
    FILE *f = fopen(mpath, "rb");
    CHECK(f);
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fclose(f);
    CHECK(truncate(mpath, sz - 100) == 0);
    char path[512];
    snprintf(path, sizeof path, "%s/mtp_ok.gguf", ds4_test_tmpdir());
    ds4_engine_opts eo = {.model_path = path, .mtp_path = mpath, .backend = DS4_BACKEND_CPU, .n_threads = 1};
    err = (ds4_err){0};
    rc = ds4_engine_open(&e, &eo, &err);
    CHECK_MSG(rc != 0 && !e && strstr(err.msg, "MTP"), "truncated MTP: rc %d '%s'", rc, err.msg);
    /* a session without MTP refuses speculation */
    CHECK(open_pair(&c, NULL, "mtp_none", true, &e, &err) == 0);
    ds4_session *s = new_session(e, 64);
    ds4_spec_opts so = {.n_draft = 3};
    CHECK(ds4_session_spec_enable(s, &so, &err) == DS4_E_ARG);
    so.n_draft = 5;
    CHECK(ds4_session_spec_enable(s, &so, &err) == DS4_E_RANGE);
    ds4_session_free(s);
    ds4_engine_close(e);
}

/* Greedy with the random MTP block equals plain greedy for every draft
 * depth, on plain and release numerics (Q8_0 attention: int8 activations). */
DS4_TEST(mtp_greedy_equals_plain_greedy) {
    for (int variant = 0; variant < 2; variant++) {
        tm_cfg c = variant ? cfg_q8() : tm_default();
        ds4_engine *e = NULL;
        ds4_err err = {0};
        CHECK_MSG(open_pair(&c, &c, variant ? "mtp_g_q8" : "mtp_g", variant == 0, &e, &err) == 0, "%s", err.msg);
        int32_t prompt[21], ref[40], got[40];
        tokens(prompt, 21, ds4_engine_n_vocab(e), 11 + (unsigned)variant);
        CHECK(greedy_plain(e, prompt, 21, ref, 40) == 0);
        for (int nd = 1; nd <= 4; nd++) {
            ds4_session *s = new_session(e, 256);
            ds4_spec_opts so = {.n_draft = nd, .gate = 0};
            CHECK(ds4_session_spec_enable(s, &so, &err) == 0);
            ds4_spec_stats st;
            int mism = 0;
            CHECK(greedy_spec(s, prompt, 21, got, 40, &st, nd == 3, e, &mism) == 0);
            CHECK_MSG(memcmp(ref, got, sizeof ref) == 0, "variant %d n_draft %d: speculative greedy differs", variant,
                      nd);
            CHECK_MSG(mism == 0, "variant %d: %d cycles left a state unlike a never-drafted session", variant, mism);
            CHECK_MSG(st.drafted > 0 && st.tokens == 40, "drafted %lld tokens %lld", (long long)st.drafted,
                      (long long)st.tokens);
            printf("  variant %d n_draft %d: %lld cycles, %lld drafts, %lld accepted\n", variant, nd,
                   (long long)st.cycles, (long long)st.drafted, (long long)st.accepted);
            ds4_session_free(s);
        }
        ds4_engine_close(e);
    }
}

/* ---- test drafters */
typedef struct drafter_ctx {
    const int32_t *ref;  /* the greedy continuation */
    int np;              /* prompt length: ref[i] is position np + i */
    int V;
    bool wrong;          /* propose a wrong token at every place */
} drafter_ctx;

static int ref_drafter(void *user, const int32_t *toks, int n, int32_t next, int32_t *drafts, int max) {
    (void)toks;
    (void)next;
    const drafter_ctx *d = user;
    int at = n + 1 - d->np; /* drafts for positions n+1.. */
    int k = 0;
    for (; k < max && at + k < 40; k++) {
        int32_t t = d->ref[at + k];
        drafts[k] = d->wrong ? (t + 1 + k) % d->V : t;
    }
    return k;
}

DS4_TEST(mtp_test_drafters_keep_greedy_and_state) {
    tm_cfg c = cfg_q8();
    ds4_engine *e = NULL;
    ds4_err err = {0};
    CHECK_MSG(open_pair(&c, NULL, "mtp_d", false, &e, &err) == 0, "%s", err.msg);
    const int V = ds4_engine_n_vocab(e);
    int32_t prompt[19], ref[40], got[40];
    tokens(prompt, 19, V, 5);
    CHECK(greedy_plain(e, prompt, 19, ref, 40) == 0);
    for (int wrong = 0; wrong < 2; wrong++)
        for (int nd = 1; nd <= 4; nd++) {
            drafter_ctx dc = {.ref = ref, .np = 19, .V = V, .wrong = wrong};
            ds4_session *s = new_session(e, 256);
            ds4_debug_session_drafter(s, ref_drafter, &dc);
            ds4_spec_opts so = {.n_draft = nd};
            CHECK(ds4_session_spec_enable(s, &so, &err) == 0);
            ds4_spec_stats st;
            int mism = 0;
            CHECK(greedy_spec(s, prompt, 19, got, 40, &st, true, e, &mism) == 0);
            CHECK_MSG(memcmp(ref, got, sizeof ref) == 0, "%s drafter, n_draft %d: output differs",
                      wrong ? "wrong" : "right", nd);
            CHECK_MSG(mism == 0, "%s drafter n_draft %d: %d states differ from a never-drafted session",
                      wrong ? "wrong" : "right", nd, mism);
            CHECK(st.drafted > 0);
            if (wrong) CHECK_MSG(st.accepted == 0, "wrong drafts accepted: %lld", (long long)st.accepted);
            else CHECK_MSG(st.accepted == st.drafted, "right drafts rejected: %lld of %lld", (long long)st.accepted,
                           (long long)st.drafted);
            ds4_session_free(s);
        }
    ds4_engine_close(e);
}

/* ---- sampling */
typedef struct fixed_drafter {
    int32_t d[4];
} fixed_drafter;

static int fixed_draft(void *user, const int32_t *toks, int n, int32_t next, int32_t *drafts, int max) {
    (void)toks;
    (void)n;
    (void)next;
    const fixed_drafter *f = user;
    int k = max < 2 ? max : 2;
    for (int i = 0; i < k; i++) drafts[i] = f->d[i];
    return k;
}

/* chi-square statistic of counts against probabilities, bins with expected
 * count < 5 pooled; *df its degrees of freedom */
static double chi2(const int *cnt, const float *p, int V, int n, int *df) {
    double x = 0, pool_e = 0, pool_o = 0;
    int bins = 0;
    for (int i = 0; i < V; i++) {
        double ex = (double)p[i] * n;
        if (ex < 5) {
            pool_e += ex;
            pool_o += cnt[i];
            if (p[i] == 0 && cnt[i] > 0) return INFINITY;
            continue;
        }
        x += (cnt[i] - ex) * (cnt[i] - ex) / ex;
        bins++;
    }
    if (pool_e >= 5) {
        x += (pool_o - pool_e) * (pool_o - pool_e) / pool_e;
        bins++;
    }
    *df = bins - 1;
    return x;
}

/* Speculative sampling draws the token after `next` from the model's
 * distribution there, and the one after an accepted draft from the
 * distribution given that draft, whatever the drafts are (a likely one, an
 * unlikely one); with coupled draws it gives exactly the tokens of plain
 * sampling with the same generator. Seeded; the 1e-4 quantile of chi-square
 * bounds a false failure. */
DS4_TEST(mtp_sampling_matches_model_distribution) {
    tm_cfg c = tm_default();
    ds4_engine *e = NULL;
    ds4_err err = {0};
    CHECK_MSG(open_pair(&c, NULL, "mtp_s", true, &e, &err) == 0, "%s", err.msg);
    const int V = ds4_engine_n_vocab(e);
    int32_t prompt[13];
    tokens(prompt, 13, V, 3);
    ds4_sampler_params p = {.temperature = 0.4f, .top_k = 0, .top_p = 1.0f, .min_p = 0.0f};
    ds4_sampler *smp = ds4_sampler_new(V, &err);
    float *p1 = malloc((size_t)V * sizeof(float)), *p2 = malloc((size_t)V * sizeof(float));
    float *l1 = malloc((size_t)V * sizeof(float)), *l2 = malloc((size_t)V * sizeof(float));
    /* reference distributions after prompt+next and prompt+next+d0 */
    ds4_session *r = new_session(e, 64);
    CHECK(ds4_session_sync(r, prompt, 13, NULL, NULL, NULL, &err) == 0);
    int32_t next;
    CHECK(ds4_session_argmax(r, &next, &err) == 0);
    CHECK(ds4_session_eval(r, next, &err) == 0);
    ds4_sampler_probs(smp, ds4_session_logits(r), &p, p1);
    memcpy(l1, ds4_session_logits(r), (size_t)V * sizeof(float));
    /* drafts: the most likely token (often accepted) then an unlikely one */
    int32_t d0 = ds4_argmax(ds4_session_logits(r), V);
    CHECK(ds4_session_eval(r, d0, &err) == 0);
    ds4_sampler_probs(smp, ds4_session_logits(r), &p, p2);
    memcpy(l2, ds4_session_logits(r), (size_t)V * sizeof(float));
    int32_t d1 = 0;
    for (int i = 0; i < V; i++)
        if (p2[i] > 0 && (p2[d1] == 0 || p2[i] < p2[d1])) d1 = i;
    ds4_session_free(r);
    fixed_drafter fd = {{d0, d1}};
    ds4_session *s = new_session(e, 64);
    ds4_debug_session_drafter(s, fixed_draft, &fd);
    ds4_spec_opts so = {.n_draft = 2};
    CHECK(ds4_session_spec_enable(s, &so, &err) == 0);
    enum { N = 6000 };
    int *c1 = calloc((size_t)V, sizeof(int)), *c2 = calloc((size_t)V, sizeof(int));
    int n2 = 0, n_same = 0;
    ds4_rng rng;
    ds4_rng_seed(&rng, 12345);
    for (int tr = 0; tr < N; tr++) {
        CHECK(ds4_session_sync(s, prompt, 13, NULL, NULL, NULL, &err) == 0);
        int32_t o[8], fol;
        int no = 0;
        ds4_rng plain = rng; /* the same generator without speculation */
        CHECK_MSG(ds4_session_spec_step(s, next, 8, &p, &rng, o, &no, &fol, &err) == 0, "%s", err.msg);
        CHECK(no >= 1 && no <= 3 && o[0] == next);
        int32_t t1 = no >= 2 ? o[1] : fol;
        /* coupled draws: the same tokens as plain sampling with that seed */
        bool same = t1 == ds4_sampler_sample(smp, l1, &p, &plain);
        if (same && t1 == d0) same = (no >= 3 ? o[2] : fol) == ds4_sampler_sample(smp, l2, &p, &plain);
        n_same += same;
        c1[t1]++;
        if (t1 == d0) { /* the token after an accepted first draft */
            c2[no >= 3 ? o[2] : fol]++;
            n2++;
        }
    }
    int df1, df2;
    double x1 = chi2(c1, p1, V, N, &df1), x2 = chi2(c2, p2, V, n2, &df2);
    /* 1e-4 upper quantile of chi-square(df) by Wilson-Hilferty */
    double z = 3.719;
    double q1 = df1 * pow(1 - 2.0 / (9 * df1) + z * sqrt(2.0 / (9 * df1)), 3);
    double q2 = df2 * pow(1 - 2.0 / (9 * df2) + z * sqrt(2.0 / (9 * df2)), 3);
    printf("  first token: chi2 %.1f (df %d, bound %.1f); after the draft (%d samples): chi2 %.1f (df %d, bound %.1f); "
           "p(d0) %.3f p(d1|d0) %.4f\n", x1, df1, q1, n2, x2, df2, q2, p1[d0], p2[d1]);
    CHECK_MSG(n_same == N, "speculative sampling differs from plain sampling with the same generator in %d of %d trials",
              N - n_same, N);
    CHECK_MSG(df1 >= 3 && x1 < q1, "first sampled token: chi2 %.1f >= %.1f (df %d)", x1, q1, df1);
    CHECK_MSG(n2 > 500 && df2 >= 3 && x2 < q2, "token after the draft: chi2 %.1f >= %.1f (df %d, %d samples)", x2, q2,
              df2, n2);
    free(c1);
    free(c2);
    free(p1);
    free(p2);
    free(l1);
    free(l2);
    ds4_sampler_free(smp);
    ds4_session_free(s);
    ds4_engine_close(e);
}

/* A generator kept across calls (the REPL keeps one for all turns) is
 * advanced by speculative sampling exactly as by plain sampling: with a
 * drafter that proposes the sampled continuation itself (every draft kept),
 * the last cycle reaches the token limit with its drafts, and no draw is
 * made past it (there was one: every later turn of a sampled REPL session
 * with --mtp then differed from the same seed without it). */
DS4_TEST(mtp_sampling_draws_nothing_past_the_limit) {
    tm_cfg c = tm_default();
    ds4_engine *e = NULL;
    ds4_err err = {0};
    CHECK_MSG(open_pair(&c, NULL, "mtp_lim", true, &e, &err) == 0, "%s", err.msg);
    const int V = ds4_engine_n_vocab(e);
    enum { NP = 11, N = 40 };
    int32_t prompt[NP], ref[N], got[N];
    tokens(prompt, NP, V, 9);
    ds4_sampler_params p = {.temperature = 0.8f, .top_k = 0, .top_p = 1.0f, .min_p = 0.0f};
    ds4_sampler *smp = ds4_sampler_new(V, &err);
    /* plain sampling as the CLI runs it: N draws for N tokens */
    ds4_rng plain;
    ds4_rng_seed(&plain, 777);
    ds4_session *r = new_session(e, 128);
    CHECK(ds4_session_sync(r, prompt, NP, NULL, NULL, NULL, &err) == 0);
    for (int i = 0; i < N; i++) {
        ref[i] = ds4_sampler_sample(smp, ds4_session_logits(r), &p, &plain);
        if (i + 1 < N) CHECK(ds4_session_eval(r, ref[i], &err) == 0);
    }
    ds4_session_free(r);
    for (int nd = 1; nd <= 4; nd++) {
        drafter_ctx dc = {.ref = ref, .np = NP, .V = V, .wrong = false};
        ds4_session *s = new_session(e, 128);
        ds4_debug_session_drafter(s, ref_drafter, &dc);
        ds4_spec_opts so = {.n_draft = nd};
        CHECK(ds4_session_spec_enable(s, &so, &err) == 0);
        CHECK(ds4_session_sync(s, prompt, NP, NULL, NULL, NULL, &err) == 0);
        ds4_rng rng;
        ds4_rng_seed(&rng, 777);
        int32_t tok = ds4_sampler_sample(smp, ds4_session_logits(s), &p, &rng), next = -1;
        int i = 0;
        while (i < N) {
            got[i] = tok;
            if (i + 1 == N) break;
            int32_t out[8];
            int no = 0;
            CHECK_MSG(ds4_session_spec_step(s, tok, N - i, &p, &rng, out, &no, &next, &err) == 0, "%s", err.msg);
            for (int k = 1; k < no && i + k < N; k++) got[i + k] = out[k];
            i += no;
            if (i >= N) break;
            CHECK_MSG(next >= 0, "n_draft %d: no following token at %d of %d", nd, i, N);
            tok = next;
        }
        CHECK_MSG(memcmp(ref, got, sizeof ref) == 0, "n_draft %d: speculative sampling gave other tokens", nd);
        CHECK_MSG(memcmp(&rng, &plain, sizeof rng) == 0,
                  "n_draft %d: the generator is not where plain sampling leaves it (a draw past the limit)", nd);
        ds4_spec_stats st;
        ds4_session_spec_stats(s, &st);
        CHECK_MSG(st.accepted == st.drafted && st.drafted > 0, "n_draft %d: %lld of %lld drafts kept", nd,
                  (long long)st.accepted, (long long)st.drafted);
        ds4_session_free(s);
    }
    ds4_sampler_free(smp);
    ds4_engine_close(e);
}

/* The MTP window is fed during prefill, decode and speculation alike: a
 * session that prefilled the prompt and one that decoded it token by token
 * draft the same tokens (their MTP windows are equal), and the strict
 * backend (every pointer checked) gives the CPU's drafts and output. */
DS4_TEST(mtp_window_feed_is_batch_independent_and_strict_clean) {
    tm_cfg c = cfg_q8();
    char path[512], mpath[512];
    snprintf(path, sizeof path, "%s/mtp_w.gguf", ds4_test_tmpdir());
    snprintf(mpath, sizeof mpath, "%s/mtp_w-mtp.gguf", ds4_test_tmpdir());
    CHECK(tm_build(&c, path) == 0 && tm_build_mtp(&c, mpath) == 0);
    int32_t prompt[23], out[3][24];
    ds4_spec_stats st[3];
    for (int run = 0; run < 3; run++) {
        ds4_engine_opts o = {.model_path = path, .mtp_path = mpath, .n_threads = 2,
                             .backend = run == 2 ? DS4_BACKEND_STRICT : DS4_BACKEND_CPU};
        ds4_engine *e = NULL;
        ds4_err err = {0};
        CHECK_MSG(ds4_engine_open(&e, &o, &err) == 0, "%s", err.msg);
        tokens(prompt, 23, ds4_engine_n_vocab(e), 17);
        ds4_session *s = new_session(e, 128);
        ds4_spec_opts so = {.n_draft = 3};
        CHECK(ds4_session_spec_enable(s, &so, &err) == 0);
        if (run == 1) {
            CHECK(ds4_session_sync(s, prompt, 1, NULL, NULL, NULL, &err) == 0);
            CHECK(ds4_session_extend(s, prompt + 1, 22, DS4_EVAL_DECODE, 1, NULL, &err) == 0);
        }
        int mism = 0;
        CHECK(greedy_spec(s, prompt, 23, out[run], 24, &st[run], false, e, &mism) == 0);
        ds4_session_free(s);
        ds4_engine_close(e);
    }
    CHECK_MSG(memcmp(out[0], out[1], sizeof out[0]) == 0 && memcmp(out[0], out[2], sizeof out[0]) == 0,
              "outputs differ between prefill/decode/strict");
    CHECK_MSG(st[0].drafted == st[1].drafted && st[0].accepted == st[1].accepted && st[0].cycles == st[1].cycles &&
              st[0].drafted == st[2].drafted && st[0].accepted == st[2].accepted,
              "drafting differs: cycles %lld/%lld/%lld drafted %lld/%lld/%lld accepted %lld/%lld/%lld",
              (long long)st[0].cycles, (long long)st[1].cycles, (long long)st[2].cycles, (long long)st[0].drafted,
              (long long)st[1].drafted, (long long)st[2].drafted, (long long)st[0].accepted, (long long)st[1].accepted,
              (long long)st[2].accepted);
}

/* ds4_sampler_probs is the distribution ds4_sampler_sample draws from, on
 * every path of TEXT.md D.3 (default, top-k, top-p, min-p, greedy): the
 * speculative acceptance rule relies on it. Seeded frequencies against the
 * probabilities (chi-square, 1e-4 bound), exclusions exact. */
DS4_TEST(sampler_probs_match_sampling_frequencies) {
    enum { V = 40, N = 20000 };
    float lg[V], pr[V];
    int cnt[V];
    ds4_err err = {0};
    ds4_sampler *smp = ds4_sampler_new(V, &err);
    CHECK(smp);
    unsigned seed = 99;
    for (int i = 0; i < V; i++) {
        seed = seed * 1103515245u + 12345u;
        lg[i] = (float)((seed >> 8) % 1000) / 250.0f;
    }
    lg[7] = lg[3]; /* an exact tie */
    ds4_sampler_params cases[] = {
        {.temperature = 1.0f, .top_p = 1.0f, .min_p = 0.05f},
        {.temperature = 0.7f, .top_k = 8, .top_p = 1.0f, .min_p = 0.0f},
        {.temperature = 1.3f, .top_p = 0.8f, .min_p = 0.0f},
        {.temperature = 0.9f, .top_k = 12, .top_p = 0.9f, .min_p = 0.1f},
        {.temperature = 0.0f, .top_p = 1.0f},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        ds4_sampler_probs(smp, lg, &cases[c], pr);
        double tot = 0;
        for (int i = 0; i < V; i++) tot += pr[i];
        CHECK_MSG(fabs(tot - 1.0) < 1e-5, "case %zu: probabilities sum to %.7f", c, tot);
        memset(cnt, 0, sizeof cnt);
        ds4_rng rng;
        ds4_rng_seed(&rng, 4242 + c);
        for (int d = 0; d < N; d++) cnt[ds4_sampler_sample(smp, lg, &cases[c], &rng)]++;
        int df = 0;
        for (int i = 0; i < V; i++) CHECK_MSG(pr[i] > 0 || cnt[i] == 0, "case %zu: token %d sampled, prob 0", c, i);
        double x = chi2(cnt, pr, V, N, &df);
        if (df < 1) { /* one candidate: greedy or degenerate */
            CHECK(cnt[ds4_argmax(lg, V)] == N);
            continue;
        }
        double z = 3.719, q = df * pow(1 - 2.0 / (9 * df) + z * sqrt(2.0 / (9 * df)), 3);
        CHECK_MSG(x < q, "case %zu: chi2 %.1f >= %.1f (df %d)", c, x, q, df);
    }
    ds4_sampler_free(smp);
}

/* visitors of the synthetic MTP description: MTP-own tensors are named
 * mtp.0.*, the shared two are the main embedding and head */
typedef struct mtp_tally {
    int n;        /* tensors visited */
    double bytes; /* of the MTP-own ones */
    int bad;      /* MTP-own ones not named mtp.0.* */
} mtp_tally;

static int count_mtp_weight(void *user, ds4_weight *w) {
    mtp_tally *t = user;
    t->n++;
    bool shared = !strcmp(w->name, "token_embd.weight") || !strcmp(w->name, "output.weight");
    if (!shared) t->bytes += (double)w->mat_bytes * (double)w->n_mat;
    if (!shared && strncmp(w->name, "mtp.0.", 6) != 0) t->bad++;
    return 0;
}
static int count_mtp_vec(void *user, void **p, size_t bytes) {
    (void)p;
    mtp_tally *t = user;
    t->n++;
    t->bytes += (double)bytes;
    return 0;
}

/* The synthetic MTP block (ds4-bench --synthetic q2 --mtp synthetic) has
 * the published file's tensors (FORMATS.md D.3): 30 of its own plus the
 * shared embedding and head, the recipe's types, and about the published
 * file's size (~3.5 GB, MODEL.md B.4). Description only: nothing is bound. */
DS4_TEST(mtp_synthetic_block_has_the_published_shapes) {
    ds4_model m, mtp;
    ds4_err err = {0};
    CHECK_MSG(ds4_model_synth(&m, "q2", 1, &err) == 0, "%s", err.msg);
    CHECK_MSG(ds4_model_synth_mtp(&mtp, &m, 1, &err) == 0, "%s", err.msg);
    mtp_tally tl = {0};
    ds4_model_visit v = {.weight = count_mtp_weight, .vec = count_mtp_vec, .user = &tl};
    CHECK(ds4_model_visit_all(&mtp, &v) == 0);
    printf("  %d weights + vectors, %.2f GB of MTP-own data\n", tl.n, tl.bytes / 1e9);
    CHECK_MSG(tl.bad == 0, "%d tensors have unexpected names", tl.bad);
    /* 32 MTP tensors, the 2 shared ones and the 2 RoPE tables */
    CHECK_MSG(tl.n == 32 + 2 + 2, "%d tensors and vectors, expected 36", tl.n);
    CHECK_MSG(tl.bytes > 3.2e9 && tl.bytes < 3.9e9, "%.2f GB, expected about 3.5", tl.bytes / 1e9);
    CHECK(mtp.mtp_e_proj.type == DS4_TYPE_Q8_0 && mtp.mtp_e_proj.n_in == 4096 && mtp.mtp_e_proj.n_out == 4096);
    CHECK(mtp.layers[0].gate_exps.type == DS4_TYPE_Q4_K && mtp.layers[0].gate_exps.n_mat == 256);
    CHECK(mtp.out_hc_fn.n_in == 16384 && mtp.out_hc_fn.n_out == 4);
    CHECK(mtp.layers[0].kind == DS4_ATTN_SLIDING && !mtp.layers[0].hash && mtp.layers[0].exp_bias);
    ds4_model_free(&mtp);
    ds4_model_free(&m);
}

/* --synthetic q2:N: the first N blocks of the published pattern (same
 * shapes, the same weights as the full recipe's blocks 0..N-1); bad counts
 * and suffixes are refused with the recipe named. */
DS4_TEST(synthetic_recipe_takes_a_block_count) {
    ds4_model full, part;
    ds4_err err = {0};
    CHECK_MSG(ds4_model_synth(&full, "q2", 1, &err) == 0, "%s", err.msg);
    CHECK_MSG(ds4_model_synth(&part, "q2:5", 1, &err) == 0, "%s", err.msg);
    CHECK(full.hp.n_layer == 43 && part.hp.n_layer == 5 && part.hp.n_hash == 3);
    for (int il = 0; il < 5; il++) {
        CHECK(part.layers[il].kind == full.layers[il].kind && part.layers[il].ratio == full.layers[il].ratio);
        CHECK(part.layers[il].hash == full.layers[il].hash);
        CHECK(part.layers[il].gate_exps.type == DS4_TYPE_IQ2_XXS && part.layers[il].gate_exps.n_mat == 256);
        CHECK(!strcmp(part.layers[il].gate_exps.name, full.layers[il].gate_exps.name));
    }
    ds4_model_free(&part);
    CHECK_MSG(ds4_model_synth(&part, "q4:1", 1, &err) == 0, "%s", err.msg);
    CHECK(part.hp.n_layer == 1 && part.hp.n_hash == 1 && part.layers[0].gate_exps.type == DS4_TYPE_Q4_K);
    ds4_model_free(&part);
    ds4_model_free(&full);
    const char *bad[] = {"q2:0", "q2:44", "q2:", "q2:x", "q2:5x", "q2:-3", "q3:5", "q2x", "q", ":5", "q2:+5"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ds4_err e2 = {0};
        CHECK_MSG(ds4_model_synth(&part, bad[i], 1, &e2) == DS4_E_ARG, "recipe '%s' accepted", bad[i]);
        CHECK_MSG(strstr(e2.msg, bad[i]) != NULL, "'%s': %s", bad[i], e2.msg);
    }
}

/* The same with the MTP block drafting: drafts drawn from its own
 * distribution q (random block: q is far from the model's p, so most
 * places end in the residual draw max(0, p - q)). */
DS4_TEST(mtp_sampling_with_mtp_drafts_matches_model_distribution) {
    tm_cfg c = tm_default();
    ds4_engine *e = NULL;
    ds4_err err = {0};
    CHECK_MSG(open_pair(&c, &c, "mtp_sq", true, &e, &err) == 0, "%s", err.msg);
    const int V = ds4_engine_n_vocab(e);
    int32_t prompt[13];
    tokens(prompt, 13, V, 8);
    ds4_sampler_params p = {.temperature = 0.5f, .top_k = 0, .top_p = 1.0f, .min_p = 0.0f};
    ds4_sampler *smp = ds4_sampler_new(V, &err);
    float *p1 = malloc((size_t)V * sizeof(float)), *p2 = malloc((size_t)V * sizeof(float));
    float *l1 = malloc((size_t)V * sizeof(float)), *l2 = malloc((size_t)V * sizeof(float));
    ds4_session *r = new_session(e, 64);
    CHECK(ds4_session_sync(r, prompt, 13, NULL, NULL, NULL, &err) == 0);
    int32_t next;
    CHECK(ds4_session_argmax(r, &next, &err) == 0);
    CHECK(ds4_session_eval(r, next, &err) == 0);
    ds4_sampler_probs(smp, ds4_session_logits(r), &p, p1);
    memcpy(l1, ds4_session_logits(r), (size_t)V * sizeof(float));
    ds4_session *s = new_session(e, 64);
    ds4_spec_opts so = {.n_draft = 2, .gate = 0};
    CHECK(ds4_session_spec_enable(s, &so, &err) == 0);
    enum { N = 5000 };
    int *c1 = calloc((size_t)V, sizeof(int)), *c2 = calloc((size_t)V * V, sizeof(int)), *nacc = calloc((size_t)V, sizeof(int));
    int n_same = 0;
    ds4_rng rng;
    ds4_rng_seed(&rng, 777);
    ds4_spec_stats st0, st1;
    ds4_session_spec_stats(s, &st0);
    for (int tr = 0; tr < N; tr++) {
        /* the last prompt token evaluated: the MTP has its state to draft from */
        CHECK(ds4_session_sync(s, prompt, 12, NULL, NULL, NULL, &err) == 0);
        CHECK(ds4_session_eval(s, prompt[12], &err) == 0);
        int32_t o[8], fol;
        int no = 0;
        ds4_rng plain = rng; /* the same generator without speculation */
        CHECK_MSG(ds4_session_spec_step(s, next, 8, &p, &rng, o, &no, &fol, &err) == 0, "%s", err.msg);
        int32_t t1 = no >= 2 ? o[1] : fol;
        n_same += t1 == ds4_sampler_sample(smp, l1, &p, &plain);
        c1[t1]++;
        if (no >= 2) { /* t1 accepted as a draft: this cycle also chose the token after it */
            nacc[t1]++;
            c2[(size_t)t1 * V + (no >= 3 ? o[2] : fol)]++;
        }
    }
    ds4_session_spec_stats(s, &st1);
    /* the second token after the first draft accepted most often */
    int32_t x = 0;
    for (int i = 0; i < V; i++)
        if (nacc[i] > nacc[x]) x = i;
    r = new_session(e, 64);
    CHECK(ds4_session_sync(r, prompt, 13, NULL, NULL, NULL, &err) == 0);
    CHECK(ds4_session_eval(r, next, &err) == 0 && ds4_session_eval(r, x, &err) == 0);
    ds4_sampler_probs(smp, ds4_session_logits(r), &p, p2);
    ds4_session_free(r);
    int df1, df2, n2 = nacc[x];
    double x1 = chi2(c1, p1, V, N, &df1), x2 = chi2(c2 + (size_t)x * V, p2, V, n2, &df2);
    double z = 3.719;
    double q1 = df1 * pow(1 - 2.0 / (9 * df1) + z * sqrt(2.0 / (9 * df1)), 3);
    double q2 = df2 > 0 ? df2 * pow(1 - 2.0 / (9 * df2) + z * sqrt(2.0 / (9 * df2)), 3) : 0;
    printf("  drafts %lld, accepted %lld; first token chi2 %.1f (df %d, bound %.1f); second after accepted draft %d "
           "(%d samples) chi2 %.1f (df %d, bound %.1f)\n", (long long)(st1.drafted - st0.drafted),
           (long long)(st1.accepted - st0.accepted), x1, df1, q1, x, n2, x2, df2, q2);
    CHECK_MSG(n_same == N, "MTP sampling differs from plain sampling with the same generator in %d of %d trials",
              N - n_same, N);
    CHECK_MSG(st1.drafted - st0.drafted >= N, "the MTP drafted only %lld times", (long long)(st1.drafted - st0.drafted));
    CHECK_MSG(n_same == N, "speculative sampling differs from plain sampling with the same generator in %d of %d trials",
              N - n_same, N);
    CHECK_MSG(df1 >= 3 && x1 < q1, "first sampled token: chi2 %.1f >= %.1f (df %d)", x1, q1, df1);
    CHECK_MSG(n2 > 150 && df2 >= 3 && x2 < q2, "second token: chi2 %.1f >= %.1f (df %d, %d samples)", x2, q2, df2, n2);
    free(c1);
    free(c2);
    free(nacc);
    free(p1);
    free(p2);
    free(l1);
    free(l2);
    ds4_sampler_free(smp);
    ds4_session_free(s);
    ds4_engine_close(e);
}
