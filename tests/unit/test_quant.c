/* test_quant.c - the quant formats: tables, FP8/FP4/f16/bf16 conversions,
 * dequantization of hand-built blocks, dots against dequantize-then-dot,
 * SIMD vs scalar agreement, quantizer error bounds and quirks.
 *
 * Expected values come from the format text of docs/FORMATS.md (hand-built
 * blocks decoded with independent arithmetic in this file), from the data
 * tables in tests/data/tables, or from the compiler's own _Float16.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quant.h"
#include "quant_impl.h"
#include "test.h"

/* ---- helpers ------------------------------------------------------------- */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static void rng_seed(uint64_t s) { rng_state = s * 0x9E3779B97F4A7C15ull + 1; }
static uint64_t rng_u64(void) {
    uint64_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return rng_state = x;
}
static float rng_unit(void) { return (float)((rng_u64() >> 40) + 0.5) / 16777216.0f; } /* (0,1) */
static float rng_gauss(void) {
    float u = rng_unit(), v = rng_unit();
    return sqrtf(-2.0f * logf(u)) * cosf(6.2831853f * v);
}
/* Heavy-tailed: Laplace with 1% outliers 8-20x larger. */
static float rng_heavy(void) {
    float u = rng_unit() - 0.5f;
    float v = (u < 0 ? 1 : -1) * logf(1 - 2 * fabsf(u));
    if (rng_unit() < 0.01f) v *= 8 + 12 * rng_unit();
    return v;
}

static float bits_f32_from_u64(uint64_t u) {
    uint32_t v = (uint32_t)u;
    float f;
    memcpy(&f, &v, 4);
    return f;
}

static uint32_t fbits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* Reads a table file (one value a line) into out[]; returns count. */
static int read_table(const char *name, uint64_t *out, int max, int hex) {
    char rel[128];
    snprintf(rel, sizeof rel, "tables/%s", name);
    FILE *f = fopen(ds4_test_path(rel), "r");
    if (!f) return -1;
    char line[128];
    int n = 0;
    while (n < max && fgets(line, sizeof line, f)) {
        if (line[0] == '\n') continue;
        out[n++] = strtoull(line, NULL, hex ? 16 : 10);
    }
    fclose(f);
    return n;
}

/* A random f16 with a finite exponent in 5..20 (|v| ~ 2^-10 .. 2^5). */
static uint16_t rand_f16_scale(void) {
    uint16_t e = (uint16_t)(5 + rng_u64() % 16), m = (uint16_t)(rng_u64() & 0x3ff);
    return (uint16_t)(((rng_u64() & 1) << 15) | (e << 10) | m);
}

/* n values' worth of random blocks of `type` with sane scale fields. */
static void *rand_row(int type, int64_t n) {
    size_t bytes = ds4_type_row_bytes(type, n);
    uint8_t *p = malloc(bytes);
    for (size_t i = 0; i < bytes; i++) p[i] = (uint8_t)rng_u64();
    const ds4_type_traits *t = ds4_type_get(type);
    for (int64_t b = 0; b < n / t->block_elems; b++) {
        uint8_t *blk = p + b * t->block_bytes;
        uint16_t s1 = rand_f16_scale(), s2 = rand_f16_scale();
        switch (type) {
        case DS4_TYPE_Q8_0:
        case DS4_TYPE_IQ2_XXS:
            memcpy(blk, &s1, 2);
            break;
        case DS4_TYPE_Q4_K:
            memcpy(blk, &s1, 2);
            memcpy(blk + 2, &s2, 2);
            break;
        case DS4_TYPE_Q2_K:
            memcpy(blk + 80, &s1, 2);
            memcpy(blk + 82, &s2, 2);
            break;
        case DS4_TYPE_F16:
            memcpy(blk, &s1, 2);
            break;
        case DS4_TYPE_BF16: {
            uint16_t h = ds4_f32_to_bf16(rng_gauss());
            memcpy(blk, &h, 2);
            break;
        }
        case DS4_TYPE_F32: {
            float f = rng_gauss();
            memcpy(blk, &f, 4);
            break;
        }
        }
    }
    return p;
}

static const int DOT_TYPES[] = {DS4_TYPE_F32, DS4_TYPE_F16, DS4_TYPE_BF16, DS4_TYPE_Q8_0,
                                DS4_TYPE_Q4_K, DS4_TYPE_Q2_K, DS4_TYPE_IQ2_XXS};
enum { N_DOT_TYPES = sizeof DOT_TYPES / sizeof DOT_TYPES[0] };

/* ---- tables and traits ----------------------------------------------------- */

DS4_TEST(quant_tables_equal_txt_files) {
    static uint64_t v[256];
    CHECK_EQ_INT(read_table("iq2xxs_grid.txt", v, 256, 1), 256);
    for (int i = 0; i < 256; i++) CHECK_MSG(ds4_iq2xxs_grid[i] == v[i], "iq2xxs_grid[%d]", i);
    CHECK_EQ_INT(read_table("iq2xxs_kgrid.txt", v, 256, 0), 256);
    for (int i = 0; i < 256; i++) CHECK_MSG(ds4_iq2xxs_kgrid[i] == v[i], "iq2xxs_kgrid[%d]", i);
    CHECK_EQ_INT(read_table("ksigns_iq2xs.txt", v, 256, 0), 128);
    for (int i = 0; i < 128; i++) CHECK_MSG(ds4_ksigns_iq2xs[i] == v[i], "ksigns[%d]", i);
    CHECK_EQ_INT(read_table("kmask_iq2xs.txt", v, 256, 0), 8);
    for (int i = 0; i < 8; i++) CHECK_MSG(ds4_kmask_iq2xs[i] == v[i], "kmask[%d]", i);
    CHECK_EQ_INT(read_table("e4m3fn_to_f32.txt", v, 256, 1), 256);
    for (int i = 0; i < 256; i++) CHECK_MSG(ds4_e4m3fn_bits[i] == v[i], "e4m3fn_bits[%d]", i);
    /* fp4 file holds decimal floats */
    FILE *f = fopen(ds4_test_path("tables/fp4_e2m1.txt"), "r");
    CHECK(f != NULL);
    for (int i = 0; i < 16; i++) {
        float x;
        CHECK(fscanf(f, "%f", &x) == 1);
        CHECK_MSG(fbits(ds4_fp4_e2m1_values[i]) == fbits(x), "fp4 value %d", i);
    }
    fclose(f);
    /* the two grid forms describe the same points (docs/FORMATS.md §0) */
    static const uint8_t level_byte[3] = {0x08, 0x19, 0x2b};
    for (int k = 0; k < 256; k++)
        for (int j = 0; j < 8; j++)
            CHECK(((ds4_iq2xxs_grid[k] >> (8 * j)) & 0xff) == level_byte[(ds4_iq2xxs_kgrid[k] >> (2 * j)) & 3]);
}

DS4_TEST(quant_traits_and_block_sizes) {
    CHECK_EQ_INT(ds4_type_row_bytes(DS4_TYPE_Q8_0, 4096), 128 * 34);
    CHECK_EQ_INT(ds4_type_row_bytes(DS4_TYPE_Q4_K, 4096), 16 * 144);
    CHECK_EQ_INT(ds4_type_row_bytes(DS4_TYPE_Q2_K, 2048), 8 * 84);
    CHECK_EQ_INT(ds4_type_row_bytes(DS4_TYPE_IQ2_XXS, 2048), 8 * 66);
    CHECK_EQ_INT(ds4_type_row_bytes(DS4_TYPE_F16, 7), 14);
    CHECK_EQ_INT(ds4_type_row_bytes(DS4_TYPE_BF16, 3), 6);
    CHECK_EQ_INT(ds4_type_row_bytes(DS4_TYPE_I32, 5), 20);
    CHECK_EQ_INT(ds4_type_row_bytes(DS4_TYPE_Q4_K, 100), 0); /* not whole blocks */
    CHECK_EQ_INT(ds4_type_row_bytes(DS4_TYPE_Q8_0, -32), 0);
    CHECK(ds4_type_get(11) == NULL); /* Q3_K: valid ggml id, not supported */
    CHECK(ds4_type_get(-1) == NULL && ds4_type_get(1000) == NULL);
    CHECK_STR(ds4_type_name(11), "q3_K");
    CHECK_STR(ds4_type_name(4), "?");
    CHECK_EQ_INT(ds4_type_act(DS4_TYPE_Q8_0), DS4_TYPE_Q8_0);
    CHECK_EQ_INT(ds4_type_act(DS4_TYPE_IQ2_XXS), DS4_TYPE_Q8_K);
    CHECK_EQ_INT(ds4_type_act(DS4_TYPE_F16), -1);
    CHECK(ds4_quant_kernels_get(DS4_TYPE_Q4_K, DS4_SIMD_SCALAR) != NULL);
    CHECK(ds4_quant_kernels_get(12345, DS4_SIMD_SCALAR) == NULL);
}

/* ---- FP8 / FP4 / UE8M0 ---------------------------------------------------- */

DS4_TEST(quant_fp8_e4m3_decode_matches_table_all_codes) {
    static uint64_t v[256];
    CHECK_EQ_INT(read_table("e4m3fn_to_f32.txt", v, 256, 1), 256);
    for (int c = 0; c < 256; c++)
        CHECK_MSG(fbits(ds4_fp8_e4m3_to_f32((uint8_t)c)) == v[c], "code %#x: %08x vs %08llx", c,
                  fbits(ds4_fp8_e4m3_to_f32((uint8_t)c)), (unsigned long long)v[c]);
}

DS4_TEST(quant_fp4_e2m1_decode_matches_table_all_codes) {
    FILE *f = fopen(ds4_test_path("tables/fp4_e2m1.txt"), "r");
    CHECK(f != NULL);
    for (int c = 0; c < 16; c++) {
        float x;
        CHECK(fscanf(f, "%f", &x) == 1);
        CHECK_MSG(fbits(ds4_fp4_e2m1_to_f32((uint8_t)c)) == fbits(x), "code %d", c);
        CHECK(fbits(ds4_fp4_e2m1_to_f32((uint8_t)(c | 0xf0))) == fbits(x)); /* high bits ignored */
    }
    fclose(f);
}

DS4_TEST(quant_ue8m0_decode) {
    CHECK(fbits(ds4_ue8m0_to_f32(0)) == 0x00400000u);
    CHECK(ds4_ue8m0_to_f32(127) == 1.0f);
    CHECK(ds4_ue8m0_to_f32(128) == 2.0f);
    CHECK(ds4_ue8m0_to_f32(120) == 0x1p-7f);
    CHECK(ds4_ue8m0_to_f32(254) == 0x1p127f);
    CHECK(isnan(ds4_ue8m0_to_f32(255)));
    for (int s = 1; s < 255; s++) CHECK(ds4_ue8m0_to_f32((uint8_t)s) == ldexpf(1.0f, s - 127));
}

DS4_TEST(quant_fp8_rows_use_128_tiles_and_fp4_rows_use_32_blocks) {
    enum { N = 300 }; /* not a multiple of 128: a partial last tile */
    uint8_t w[N], sc[3], packed[N / 2], sc4[N / 32 + 1];
    float y[N];
    rng_seed(7);
    for (int i = 0; i < N; i++) w[i] = (uint8_t)rng_u64();
    for (int i = 0; i < N; i++)
        if ((w[i] & 0x7f) == 0x7f) w[i] ^= 1; /* no NaN codes */
    sc[0] = 120, sc[1] = 127, sc[2] = 131;
    ds4_fp8_dequant_row(w, sc, y, N);
    for (int i = 0; i < N; i++) {
        float want = bits_f32_from_u64(ds4_e4m3fn_bits[w[i]]) * ldexpf(1.0f, sc[i / 128] - 127);
        CHECK_MSG(fbits(y[i]) == fbits(want), "fp8 element %d", i);
    }
    /* a 260 x 300 matrix: 3 x 3 tiles, the last ones partial */
    enum { NR = 260 };
    uint8_t *wm = malloc(NR * N), msc[9];
    float *ym = malloc(NR * N * sizeof(float));
    for (int i = 0; i < NR * N; i++) wm[i] = (uint8_t)(rng_u64() & 0x7e);
    for (int i = 0; i < 9; i++) msc[i] = (uint8_t)(118 + 2 * i);
    ds4_fp8_dequant_matrix(wm, msc, ym, NR, N);
    for (int r = 0; r < NR; r += 7)
        for (int c = 0; c < N; c += 3) {
            float want = bits_f32_from_u64(ds4_e4m3fn_bits[wm[r * N + c]]) * ldexpf(1.0f, msc[(r / 128) * 3 + c / 128] - 127);
            CHECK_MSG(fbits(ym[r * N + c]) == fbits(want), "fp8 matrix (%d, %d)", r, c);
        }
    free(wm);
    free(ym);
    /* FP4: 288 values = 9 blocks of 32; element 2j is the low nibble */
    for (int i = 0; i < 144; i++) packed[i] = (uint8_t)rng_u64();
    for (int b = 0; b < 9; b++) sc4[b] = (uint8_t)(110 + b * 3);
    ds4_fp4_dequant_row(packed, sc4, y, 288);
    for (int i = 0; i < 288; i++) {
        int code = (i & 1) ? packed[i / 2] >> 4 : packed[i / 2] & 15;
        float want = ds4_fp4_e2m1_values[code] * ldexpf(1.0f, sc4[i / 32] - 127);
        CHECK_MSG(fbits(y[i]) == fbits(want), "fp4 element %d", i);
    }
}

/* ---- f16 / bf16 ------------------------------------------------------------ */

DS4_TEST(quant_f16_conversion_matches_compiler_float16) {
    /* decode: every code; encode: the compiler's RNE conversion */
    for (uint32_t h = 0; h < 65536; h++) {
        _Float16 hf;
        uint16_t hh = (uint16_t)h;
        memcpy(&hf, &hh, 2);
        float want = (float)hf, got = ds4_f16_to_f32(hh);
        if (isnan(want)) {
            CHECK(isnan(got));
            continue;
        }
        CHECK_MSG(fbits(got) == fbits(want), "f16 %#x", h);
        CHECK_MSG(ds4_f32_to_f16(got) == hh, "f16 round trip %#x", h);
    }
    rng_seed(11);
    for (int i = 0; i < 2000000; i++) {
        uint32_t u = (uint32_t)rng_u64();
        if (i & 1) u = (u & 0x87ffffffu) | 0x30000000u; /* near the f16 range */
        float f;
        memcpy(&f, &u, 4);
        if (isnan(f)) {
            CHECK((ds4_f32_to_f16(f) & 0x7fff) == 0x7e00);
            continue;
        }
        _Float16 hf = (_Float16)f;
        uint16_t want;
        memcpy(&want, &hf, 2);
        CHECK_MSG(ds4_f32_to_f16(f) == want, "f32 %08x -> %04x, want %04x", u, ds4_f32_to_f16(f), want);
    }
    CHECK(ds4_f32_to_f16(65504.0f) == 0x7bff);
    CHECK(ds4_f32_to_f16(65519.99f) == 0x7bff);
    CHECK(ds4_f32_to_f16(65520.0f) == 0x7c00);
    CHECK(ds4_f32_to_f16(-0x1p-25f) == 0x8000);
    CHECK(ds4_f32_to_f16(0x1.000002p-25f) == 0x0001);
}

DS4_TEST(quant_bf16_conversion_rounds_to_nearest_even) {
    CHECK(ds4_f32_to_bf16(1.0f) == 0x3f80);
    CHECK(ds4_f32_to_bf16(1.0f + 0x1p-8f) == 0x3f80);        /* tie -> even */
    CHECK(ds4_f32_to_bf16(1.0f + 3 * 0x1p-8f) == 0x3f82);    /* tie -> even (up) */
    CHECK(ds4_f32_to_bf16(1.0f + 0x1p-8f + 0x1p-20f) == 0x3f81);
    CHECK(ds4_f32_to_bf16(-2.0f) == 0xc000);
    CHECK(ds4_f32_to_bf16(INFINITY) == 0x7f80);
    CHECK(ds4_f32_to_bf16(0x1.fffffep127f) == 0x7f80); /* rounds up to inf */
    float qnan = NAN, snan;
    uint32_t sn = 0x7f800001u;
    memcpy(&snan, &sn, 4);
    CHECK(ds4_f32_to_bf16(qnan) == 0x7fc0);
    CHECK(ds4_f32_to_bf16(snan) == 0x7fc0); /* quieted: bit 6 set */
    /* against double arithmetic: bf16 keeps 8 significant bits */
    rng_seed(12);
    for (int i = 0; i < 200000; i++) {
        float f = rng_gauss() * ldexpf(1.0f, (int)(rng_u64() % 60) - 30);
        float back = ds4_bf16_to_f32(ds4_f32_to_bf16(f));
        int e;
        frexp((double)f, &e);
        double ulp = ldexp(1.0, e - 8);
        CHECK_MSG(fabs((double)back - (double)f) <= ulp / 2, "bf16 of %a", (double)f);
    }
}

/* ---- dequantization of hand-built blocks ---------------------------------- */

DS4_TEST(quant_dequant_q8_0_hand_built) {
    ds4_block_q8_0 b[2];
    b[0].d = 0x3800; /* 0.5 */
    b[1].d = 0xc400; /* -4 */
    for (int i = 0; i < 32; i++) b[0].qs[i] = (int8_t)(i - 16), b[1].qs[i] = (int8_t)(127 - 8 * i);
    float y[64];
    ds4_dequant_row(DS4_TYPE_Q8_0, b, y, 64);
    for (int i = 0; i < 32; i++) {
        CHECK(y[i] == 0.5f * (i - 16));
        CHECK(y[32 + i] == -4.0f * (127 - 8 * i));
    }
}

DS4_TEST(quant_dequant_q4_k_hand_built) {
    ds4_block_q4_k b;
    memset(&b, 0, sizeof b);
    b.d = 0x3c00;    /* 1.0 */
    b.dmin = 0x3400; /* 0.25 */
    int sc[8] = {1, 7, 13, 63, 40, 17, 33, 62}, m[8] = {0, 5, 63, 2, 48, 31, 16, 9};
    /* pack per docs/FORMATS.md B.3, bit by bit */
    for (int j = 0; j < 8; j++) {
        if (j < 4) {
            b.scales[j] |= (uint8_t)sc[j];
            b.scales[j + 4] |= (uint8_t)m[j];
        } else {
            b.scales[j + 4] |= (uint8_t)((sc[j] & 15) | ((m[j] & 15) << 4));
            b.scales[j - 4] |= (uint8_t)((sc[j] >> 4) << 6);
            b.scales[j] |= (uint8_t)((m[j] >> 4) << 6);
        }
    }
    int q[256];
    for (int i = 0; i < 256; i++) q[i] = (i * 7 + 3) % 16;
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) b.qs[32 * c + l] = (uint8_t)(q[64 * c + l] | (q[64 * c + 32 + l] << 4));
    float y[256];
    ds4_dequant_row(DS4_TYPE_Q4_K, &b, y, 256);
    for (int i = 0; i < 256; i++) {
        int j = i / 32;
        float want = (1.0f * sc[j]) * q[i] - 0.25f * m[j];
        CHECK_MSG(y[i] == want, "q4_K value %d: %g vs %g", i, y[i], want);
    }
}

DS4_TEST(quant_dequant_q2_k_hand_built) {
    ds4_block_q2_k b;
    memset(&b, 0, sizeof b);
    b.d = 0x4000;    /* 2.0 */
    b.dmin = 0x3800; /* 0.5 */
    int q[256];
    for (int j = 0; j < 16; j++) b.scales[j] = (uint8_t)((j % 16) | (((15 - j) % 16) << 4));
    for (int i = 0; i < 256; i++) q[i] = (i / 3) % 4;
    for (int i = 0; i < 256; i++) {
        int h = i / 128, r = i % 128;
        b.qs[32 * h + r % 32] |= (uint8_t)(q[i] << (2 * (r / 32)));
    }
    float y[256];
    ds4_dequant_row(DS4_TYPE_Q2_K, &b, y, 256);
    for (int i = 0; i < 256; i++) {
        int j = i / 16;
        float want = (2.0f * j) * q[i] - 0.5f * (15 - j);
        CHECK_MSG(y[i] == want, "q2_K value %d", i);
    }
}

DS4_TEST(quant_dequant_iq2_xxs_hand_built) {
    ds4_block_iq2_xxs b;
    memset(&b, 0, sizeof b);
    b.d = 0x3c00; /* 1.0 */
    /* group 3: grid indices 5, 77, 200, 255; sign indices 0, 1, 64, 127; ls = 9 */
    int g[4] = {5, 77, 200, 255}, s[4] = {0, 1, 64, 127}, ls = 9;
    uint32_t a0 = 0, a1 = (uint32_t)ls << 28;
    for (int k = 0; k < 4; k++) a0 |= (uint32_t)g[k] << (8 * k), a1 |= (uint32_t)s[k] << (7 * k);
    memcpy(&b.qs[12], &a0, 4);
    memcpy(&b.qs[14], &a1, 4);
    float y[256];
    ds4_dequant_row(DS4_TYPE_IQ2_XXS, &b, y, 256);
    float db = 1.0f * (0.5f + ls) * 0.25f;
    for (int k = 0; k < 4; k++)
        for (int j = 0; j < 8; j++) {
            int mag = (int)((ds4_iq2xxs_grid[g[k]] >> (8 * j)) & 0xff);
            /* sign j: stored bit j for j < 7; bit 7 makes the count even */
            int neg = j < 7 ? (s[k] >> j) & 1 : __builtin_popcount(s[k]) & 1;
            float want = db * mag * (neg ? -1 : 1);
            CHECK_MSG(y[96 + 8 * k + j] == want, "iq2 group 3 sub %d elem %d", k, j);
        }
    /* groups with all-zero words decode to d * 0.125 * 8 = d (the quirk) */
    for (int i = 0; i < 96; i++) CHECK(y[i] == 1.0f);
}

DS4_TEST(quant_dequant_f16_bf16_i32_rows) {
    uint16_t h[3] = {0x3c00, 0xc000, 0x7bff};
    float y[3];
    ds4_dequant_row(DS4_TYPE_F16, h, y, 3);
    CHECK(y[0] == 1.0f && y[1] == -2.0f && y[2] == 65504.0f);
    uint16_t bf[2] = {0x3f80, 0xc0a0};
    ds4_dequant_row(DS4_TYPE_BF16, bf, y, 2);
    CHECK(y[0] == 1.0f && y[1] == -5.0f);
    int32_t iv[3] = {-7, 0, 255};
    ds4_dequant_row(DS4_TYPE_I32, iv, y, 3);
    CHECK(y[0] == -7.0f && y[1] == 0.0f && y[2] == 255.0f);
}

/* ---- dots ------------------------------------------------------------------ */

/* Every SIMD path: dot_f32 == sum of dequant * x (double reference) within
 * float rounding; dequant bit-identical across paths. */
DS4_TEST(quant_dot_f32_equals_dequant_then_dot_all_paths) {
    enum { N = 4096 };
    float *x = malloc(N * 4), *y = malloc(N * 4), *y2 = malloc(N * 4);
    rng_seed(21);
    for (int i = 0; i < N; i++) x[i] = rng_gauss();
    for (int ti = 0; ti < N_DOT_TYPES; ti++) {
        int type = DOT_TYPES[ti];
        void *row = rand_row(type, N);
        const ds4_quant_kernels *ks = ds4_quant_kernels_get(type, DS4_SIMD_SCALAR);
        ks->dequant(row, y, N);
        double ref = 0, mag = 0;
        for (int i = 0; i < N; i++) ref += (double)y[i] * x[i], mag += fabs((double)y[i] * x[i]);
        for (int simd = DS4_SIMD_SCALAR; simd <= DS4_SIMD_AMX; simd++) {
            const ds4_quant_kernels *k = ds4_quant_kernels_get(type, simd);
            if (!k) continue; /* this CPU lacks the path */
            k->dequant(row, y2, N);
            CHECK_MSG(memcmp(y, y2, N * 4) == 0, "%s dequant differs on simd %d", ds4_type_name(type), simd);
            float d = k->dot_f32(row, x, N);
            CHECK_MSG(fabs(d - ref) <= 1e-5 * mag, "%s simd %d: dot %.9g vs %.9g (mag %g)",
                      ds4_type_name(type), simd, d, ref, mag);
        }
        free(row);
    }
    free(x), free(y), free(y2);
}

/* Plain types take any row length: odd lengths exercise the SIMD tails. */
DS4_TEST(quant_plain_types_odd_lengths_all_paths) {
    enum { N = 1001 };
    static const int types[] = {DS4_TYPE_F32, DS4_TYPE_F16, DS4_TYPE_BF16};
    float x[N], y[N], y2[N];
    rng_seed(23);
    for (int i = 0; i < N; i++) x[i] = rng_gauss();
    for (int ti = 0; ti < 3; ti++) {
        int type = types[ti];
        void *row = rand_row(type, N);
        ds4_quant_kernels_get(type, DS4_SIMD_SCALAR)->dequant(row, y, N);
        double ref = 0, mag = 0;
        for (int i = 0; i < N; i++) ref += (double)y[i] * x[i], mag += fabs((double)y[i] * x[i]);
        for (int simd = DS4_SIMD_SCALAR; simd <= DS4_SIMD_AMX; simd++) {
            const ds4_quant_kernels *k = ds4_quant_kernels_get(type, simd);
            if (!k) continue;
            for (int n = N - 7; n <= N; n++) {
                memset(y2, 0, sizeof y2);
                k->dequant(row, y2, n);
                CHECK_MSG(memcmp(y, y2, (size_t)n * 4) == 0 && y2[n - 1] == y[n - 1], "%s n=%d simd %d",
                          ds4_type_name(type), n, simd);
            }
            CHECK_NEAR(k->dot_f32(row, x, N), ref, 1e-5 * mag);
        }
        free(row);
    }
}

/* dequantized activation of Q8_0 / Q8_K blocks */
static void dequant_act(int act, const void *xq, float *y, int64_t n) {
    if (act == DS4_TYPE_Q8_0) {
        ds4_dequant_row(DS4_TYPE_Q8_0, xq, y, n);
        return;
    }
    const ds4_block_q8_k *b = xq;
    for (int64_t i = 0; i < n; i++) y[i] = b[i / 256].d * b[i / 256].qs[i % 256];
}

/* dot_q == exact dot of the dequantized weight and dequantized activation
 * (only the per-block float combination rounds), on every path; the
 * activation quantizers agree bit for bit across paths; bsums are right. */
DS4_TEST(quant_dot_q_equals_dot_of_dequantized_operands) {
    enum { N = 4096 };
    float *x = malloc(N * 4), *y = malloc(N * 4), *xa = malloc(N * 4);
    uint8_t *xq = malloc(N / 256 * sizeof(ds4_block_q8_k)), *xq2 = malloc(N / 256 * sizeof(ds4_block_q8_k));
    rng_seed(22);
    for (int i = 0; i < N; i++) x[i] = (i % 3) ? rng_gauss() : rng_heavy();
    for (int ti = 0; ti < N_DOT_TYPES; ti++) {
        int type = DOT_TYPES[ti], act = ds4_type_act(type);
        if (act < 0) continue;
        void *row = rand_row(type, N);
        ds4_dequant_row(type, row, y, N);
        size_t act_bytes = ds4_type_row_bytes(act, N);
        ds4_quant_kernels_get(type, DS4_SIMD_SCALAR)->quantize_act(x, xq, N);
        dequant_act(act, xq, xa, N);
        double ref = 0, mag = 0;
        for (int i = 0; i < N; i++) ref += (double)y[i] * xa[i], mag += fabs((double)y[i] * xa[i]);
        if (act == DS4_TYPE_Q8_K) {
            const ds4_block_q8_k *b = (const ds4_block_q8_k *)xq;
            for (int k = 0; k < 16; k++) {
                int s = 0;
                for (int i = 0; i < 16; i++) s += b[3].qs[16 * k + i];
                CHECK(b[3].bsums[k] == s);
            }
        }
        for (int simd = DS4_SIMD_SCALAR; simd <= DS4_SIMD_AMX; simd++) {
            const ds4_quant_kernels *k = ds4_quant_kernels_get(type, simd);
            if (!k) continue;
            k->quantize_act(x, xq2, N);
            CHECK_MSG(memcmp(xq, xq2, act_bytes) == 0, "%s act quant differs on simd %d", ds4_type_name(type), simd);
            float d = k->dot_q(row, xq, N);
            CHECK_MSG(fabs(d - ref) <= 2e-6 * mag, "%s simd %d: dot_q %.9g vs %.9g", ds4_type_name(type), simd, d, ref);
            /* exact integer sums + the same block combination: bit-identical */
            float d_scalar = ds4_quant_kernels_get(type, DS4_SIMD_SCALAR)->dot_q(row, xq, N);
            CHECK_MSG(fbits(d) == fbits(d_scalar), "%s simd %d: dot_q %.9g != scalar %.9g", ds4_type_name(type), simd,
                      d, d_scalar);
        }
        /* and the int8 path is close to the f32 path */
        float df = ds4_dot_row_f32(type, row, x, N), dq = ds4_dot_row_q(type, row, xq, N);
        double magf = 0;
        for (int i = 0; i < N; i++) magf += fabs((double)y[i] * x[i]);
        CHECK_MSG(fabs(dq - df) <= 0.01 * magf, "%s: int8 dot %g vs f32 dot %g (mag %g)", ds4_type_name(type), dq, df, magf);
        free(row);
    }
    free(x), free(y), free(xa), free(xq), free(xq2);
}

/* The tiles are the row dots bit for bit, for every tile shape (row and
 * token counts that do not fill a micro-tile, repeated token rows), so a
 * batched matrix product is bit-identical to one token at a time. */
DS4_TEST(quant_tiles_equal_row_dots_bitwise) {
    enum { NR = 19, NT = 18 };
    rng_seed(24);
    for (int ti = 0; ti < N_DOT_TYPES; ti++) {
        int type = DOT_TYPES[ti], act = ds4_type_act(type);
        const int64_t n = act < 0 ? 1001 : 512; /* plain types: odd length, SIMD tails */
        size_t rb = ds4_type_row_bytes(type, n);
        uint8_t *w = malloc(NR * rb);
        for (int r = 0; r < NR; r++) {
            void *row = rand_row(type, n);
            memcpy(w + r * rb, row, rb);
            free(row);
        }
        float *x = malloc(NT * n * sizeof(float));
        for (int64_t i = 0; i < NT * n; i++) x[i] = (i % 5) ? rng_gauss() : rng_heavy();
        size_t ab = act < 0 ? 0 : ds4_type_row_bytes(act, n);
        uint8_t *xq = act < 0 ? NULL : malloc(NT * ab);
        /* with AVX-512 VBMI: its decode walk, then the other one */
        ds4_quant_simd_best();
        const int vbmi = ds4_quant_vbmi;
        for (int vb = vbmi; vb >= 0; vb--)
        for (int simd = DS4_SIMD_SCALAR; simd <= DS4_SIMD_AMX; simd++) {
            ds4_quant_vbmi = vb;
            const ds4_quant_kernels *k = ds4_quant_kernels_get(type, simd);
            if (!k) continue;
            for (int t = 0; xq && t < NT; t++) k->quantize_act(x + t * n, xq + t * ab, n);
            const void *xp[NT];
            const float *xf[NT];
            for (int t = 0; t < NT; t++) {
                int tt = t == 5 ? 2 : t; /* a repeated activation row, as expert token lists have */
                xp[t] = xq ? xq + tt * ab : NULL;
                xf[t] = x + tt * n;
            }
            float ref[NT][NR], y[NT][NR];
            for (int t = 0; t < NT; t++)
                for (int r = 0; r < NR; r++)
                    ref[t][r] = xq ? k->dot_q(w + r * rb, xp[t], n) : k->dot_f32(w + r * rb, xf[t], n);
            for (int nr = 1; nr <= NR; nr++)
                for (int nt = 1; nt <= NT; nt++) {
                    if (xq && !k->dot_q_tile) continue;
                    if (!xq && !k->dot_f32_tile) continue;
                    memset(y, 0xff, sizeof y);
                    if (xq) k->dot_q_tile(w, rb, nr, xp, nt, n, &y[0][0], NR);
                    else k->dot_f32_tile(w, rb, nr, xf, nt, n, &y[0][0], NR);
                    int bad = 0;
                    for (int t = 0; t < NT; t++)
                        for (int r = 0; r < NR; r++) {
                            int in = t < nt && r < nr;
                            uint32_t want = in ? fbits(ref[t][r]) : 0xffffffffu;
                            bad += fbits(y[t][r]) != want;
                        }
                    CHECK_MSG(!bad, "%s simd %d vbmi %d tile %d x %d: %d values differ from the row dot",
                              ds4_type_name(type), simd, vb, nr, nt, bad);
                }
        }
        ds4_quant_vbmi = vbmi;
        free(w), free(x), free(xq);
    }
}

/* The prefill tiles at the experts' widths and beyond their token groups:
 * Q8_K types with 2048 (the down projection: Q2_K's AMX path), 4096 (the
 * IQ2_XXS tile's expanded-row path, several token groups and a short last
 * one) and 8192 columns (longer rows take the walk), and Q8_0 (several
 * passes at 8192); 20 rows (a 16-row AMX group and 4 more), 75 tokens;
 * every (row, token) pair the row dot bit for bit, at every SIMD level of
 * this CPU that has tiles. */
DS4_TEST(quant_tiles_equal_row_dots_at_expert_widths) {
    enum { NR = 20, NT = 75 };
    static const int types[] = {DS4_TYPE_IQ2_XXS, DS4_TYPE_Q2_K, DS4_TYPE_Q4_K, DS4_TYPE_Q8_0};
    static const int64_t widths[] = {2048, 4096, 8192};
    rng_seed(31);
    for (int ti = 0; ti < 4; ti++)
        for (int wi = 0; wi < 3; wi++) {
            int type = types[ti], act = ds4_type_act(type);
            const int64_t n = widths[wi];
            size_t rb = ds4_type_row_bytes(type, n), ab = ds4_type_row_bytes(act, n);
            uint8_t *w = malloc(NR * rb), *xq = malloc(NT * ab);
            for (int r = 0; r < NR; r++) {
                void *row = rand_row(type, n);
                memcpy(w + r * rb, row, rb);
                free(row);
            }
            float *x = malloc(n * sizeof(float));
            for (int t = 0; t < NT; t++) {
                for (int64_t i = 0; i < n; i++) x[i] = (i % 5) ? rng_gauss() : rng_heavy();
                ds4_quantize_act(act, x, xq + t * ab, n);
            }
            const void *xp[NT];
            for (int t = 0; t < NT; t++) xp[t] = xq + t * ab;
            /* every SIMD level with tiles that this CPU runs (AVX2; AVX-512 VNNI, with and without VBMI; AMX) */
            ds4_quant_simd_best();
            const int vbmi = ds4_quant_vbmi;
            for (int vb = vbmi; vb >= 0; vb--)
            for (int simd = DS4_SIMD_AVX2; simd <= DS4_SIMD_AMX; simd++) {
                ds4_quant_vbmi = vb;
                const ds4_quant_kernels *k = ds4_quant_kernels_get(type, simd);
                if (!k || !k->dot_q_tile) continue;
                static float y[NT][NR];
                k->dot_q_tile(w, rb, NR, xp, NT, n, &y[0][0], NR);
                int bad = 0;
                for (int t = 0; t < NT; t++)
                    for (int r = 0; r < NR; r++) bad += fbits(y[t][r]) != fbits(k->dot_q(w + r * rb, xp[t], n));
                CHECK_MSG(!bad, "%s n %lld simd %d vbmi %d: %d of %d tile values differ from the row dot",
                          ds4_type_name(type), (long long)n, simd, vb, bad, NR * NT);
            }
            ds4_quant_vbmi = vbmi;
            free(w), free(xq), free(x);
        }
}

/* ---- quantizers ------------------------------------------------------------ */

static double rel_rmse(const float *x, const float *y, int n, const float *w) {
    double e = 0, s = 0;
    for (int i = 0; i < n; i++) {
        double wi = w ? w[i] : 1.0;
        e += wi * (x[i] - y[i]) * (x[i] - y[i]);
        s += wi * x[i] * x[i];
    }
    return sqrt(e / s);
}

/* quantize -> dequantize error bounds on Gaussian rows (relative RMSE). */
DS4_TEST(quant_quantize_dequantize_rmse_bounds) {
    enum { N = 4096 };
    static const struct { int type; double bound; } cases[] = {
        {DS4_TYPE_F32, 0.0}, {DS4_TYPE_F16, 0.0005}, {DS4_TYPE_BF16, 0.004},
        {DS4_TYPE_Q8_0, 0.01}, {DS4_TYPE_Q4_K, 0.11}, {DS4_TYPE_Q2_K, 0.45},
        {DS4_TYPE_IQ2_XXS, 0.45},
    };
    float *x = malloc(N * 4), *y = malloc(N * 4), *imp = malloc(N * 4);
    uint8_t *q = malloc(N * 4);
    rng_seed(31);
    for (int i = 0; i < N; i++) x[i] = rng_gauss(), imp[i] = 1.0f;
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        int type = cases[c].type;
        size_t bytes = ds4_quantize_row(type, x, q, N, type == DS4_TYPE_IQ2_XXS ? imp : NULL);
        CHECK_EQ_INT(bytes, ds4_type_row_bytes(type, N));
        ds4_dequant_row(type, q, y, N);
        double r = rel_rmse(x, y, N, NULL);
        CHECK_MSG(r <= cases[c].bound, "%s: relative rmse %.4f > %.4f", ds4_type_name(type), r, cases[c].bound);
    }
    /* refusals: IQ2_XXS needs importance; non-finite values; bad length */
    CHECK_EQ_INT(ds4_quantize_row(DS4_TYPE_IQ2_XXS, x, q, N, NULL), 0);
    CHECK_EQ_INT(ds4_quantize_row(DS4_TYPE_Q4_K, x, q, 100, NULL), 0);
    CHECK_EQ_INT(ds4_quantize_row(DS4_TYPE_I32, x, q, 256, NULL), 0);
    x[5] = NAN;
    CHECK_EQ_INT(ds4_quantize_row(DS4_TYPE_Q2_K, x, q, N, NULL), 0);
    ds4_err err;
    CHECK_EQ_INT(ds4_quantize_rows(DS4_TYPE_Q4_K, x, q, 1, N, NULL, &err), DS4_E_ARG);
    CHECK(strstr(err.msg, "non-finite") != NULL);
    CHECK_EQ_INT(ds4_quantize_rows(DS4_TYPE_Q4_K, x, q, 2, 300, NULL, &err), DS4_E_ARG);
    free(x), free(y), free(imp), free(q);
}

/* Q8_0 uses roundf: ties go away from zero; the scale is amax/127 in f16. */
DS4_TEST(quant_q8_0_rounding_ties_away_from_zero) {
    float x[32] = {0};
    x[0] = 127.0f; /* d = 1 exactly, so x[i] are the scaled values */
    x[1] = 2.5f, x[2] = -2.5f, x[3] = 0.5f, x[4] = -0.5f, x[5] = 3.5f, x[6] = -127.0f;
    ds4_block_q8_0 b;
    CHECK_EQ_INT(ds4_quantize_row(DS4_TYPE_Q8_0, x, &b, 32, NULL), 34);
    CHECK(b.d == 0x3c00);
    CHECK(b.qs[0] == 127 && b.qs[1] == 3 && b.qs[2] == -3 && b.qs[3] == 1 && b.qs[4] == -1);
    CHECK(b.qs[5] == 4 && b.qs[6] == -127 && b.qs[7] == 0);
    memset(x, 0, sizeof x);
    CHECK_EQ_INT(ds4_quantize_row(DS4_TYPE_Q8_0, x, &b, 32, NULL), 34);
    CHECK(b.d == 0);
    for (int i = 0; i < 32; i++) CHECK(b.qs[i] == 0);
}

/* IQ2_XXS: an all-zero group is encoded as grid 0 / signs 0 / ls 0 and so
 * decodes to d for every element; an all-zero block has d = 0. Signs: at most
 * one element per 8 has a flipped sign (the even-parity fix-up). */
DS4_TEST(quant_iq2_xxs_zero_group_quirk_and_sign_parity) {
    float x[512], imp[512], y[512];
    ds4_block_iq2_xxs b[2];
    rng_seed(41);
    for (int i = 0; i < 512; i++) x[i] = rng_gauss(), imp[i] = 0.5f + rng_unit();
    for (int i = 64; i < 96; i++) x[i] = 0.0f; /* block 0, group 2 */
    for (int i = 256; i < 512; i++) x[i] = 0.0f; /* block 1 all zero */
    CHECK_EQ_INT(ds4_quantize_row(DS4_TYPE_IQ2_XXS, x, b, 512, imp), 132);
    uint32_t a0, a1;
    memcpy(&a0, &b[0].qs[8], 4);
    memcpy(&a1, &b[0].qs[10], 4);
    CHECK(a0 == 0 && a1 == 0);
    CHECK(b[0].d != 0);
    ds4_dequant_row(DS4_TYPE_IQ2_XXS, b, y, 512);
    for (int i = 64; i < 96; i++) CHECK(y[i] == ds4_f16_to_f32(b[0].d));
    CHECK(b[1].d == 0);
    for (int i = 0; i < 32; i++) CHECK(b[1].qs[i] == 0);
    for (int i = 256; i < 512; i++) CHECK(y[i] == 0.0f);
    for (int k = 0; k < 32; k++) {
        if (k >= 8 && k < 12) continue; /* the zero group */
        int flips = 0;
        for (int j = 0; j < 8; j++) flips += (x[8 * k + j] < 0) != (y[8 * k + j] < 0);
        CHECK_MSG(flips <= 1, "sub-group %d has %d sign flips", k, flips);
    }
}

/* Structural checks on quantizer output: 6-bit / 4-bit scales in range and
 * K-quant levels reproduce the sub-block minimum sign convention. */
DS4_TEST(quant_k_quant_structure) {
    enum { N = 2048 };
    float x[N], imp[N];
    uint8_t q[N];
    rng_seed(51);
    for (int i = 0; i < N; i++) x[i] = rng_heavy(), imp[i] = rng_unit();
    for (int wi = 0; wi < 2; wi++) {
        CHECK(ds4_quantize_row(DS4_TYPE_Q4_K, x, q, N, wi ? imp : NULL) > 0);
        for (int b = 0; b < N / 256; b++) {
            ds4_block_q4_k blk;
            memcpy(&blk, q + b * sizeof blk, sizeof blk);
            CHECK(!(ds4_f16_to_f32(blk.d) < 0) && !(ds4_f16_to_f32(blk.dmin) < 0));
        }
        CHECK(ds4_quantize_row(DS4_TYPE_Q2_K, x, q, N, wi ? imp : NULL) > 0);
        for (int b = 0; b < N / 256; b++) {
            ds4_block_q2_k blk;
            memcpy(&blk, q + b * sizeof blk, sizeof blk);
            CHECK(!(ds4_f16_to_f32(blk.d) < 0) && !(ds4_f16_to_f32(blk.dmin) < 0));
        }
    }
}

/* With an importance vector, the importance-weighted error is lower than
 * without (Q4_K / Q2_K: reference path; IQ2_XXS: synthetic importance of
 * C.6), on Gaussian and heavy-tailed rows. */
DS4_TEST(quant_importance_weights_lower_weighted_error) {
    enum { R = 16, N = 2048 };
    float *x = malloc(R * N * 4), *y = malloc(N * 4), *imp = malloc(N * 4);
    uint8_t *q = malloc(R * N), *q2 = malloc(R * N);
    for (int dist = 0; dist < 2; dist++) {
        rng_seed(61 + dist);
        for (int i = 0; i < R * N; i++) x[i] = dist ? rng_heavy() : rng_gauss();
        for (int c = 0; c < N; c++) {
            float u = rng_unit();
            imp[c] = expf(6.0f * u * u) - 0.9f; /* positive, heavy spread */
        }
        static const int types[] = {DS4_TYPE_Q4_K, DS4_TYPE_Q2_K, DS4_TYPE_IQ2_XXS};
        for (int ti = 0; ti < 3; ti++) {
            int type = types[ti];
            size_t rb = ds4_type_row_bytes(type, N);
            CHECK_EQ_INT(ds4_quantize_rows(type, x, q, R, N, NULL, NULL), 0);
            CHECK_EQ_INT(ds4_quantize_rows(type, x, q2, R, N, imp, NULL), 0);
            double e0 = 0, e1 = 0, s = 0;
            for (int r = 0; r < R; r++) {
                const float *xr = x + r * N;
                ds4_dequant_row(type, q + r * rb, y, N);
                for (int i = 0; i < N; i++) e0 += imp[i] * (xr[i] - y[i]) * (xr[i] - y[i]), s += imp[i] * xr[i] * xr[i];
                ds4_dequant_row(type, q2 + r * rb, y, N);
                for (int i = 0; i < N; i++) e1 += imp[i] * (xr[i] - y[i]) * (xr[i] - y[i]);
            }
            CHECK_MSG(e1 < e0, "%s dist %d: weighted rmse with imatrix %.4f >= without %.4f",
                      ds4_type_name(type), dist, sqrt(e1 / s), sqrt(e0 / s));
        }
    }
    free(x), free(y), free(imp), free(q), free(q2);
}

/* The IQ2_XXS quantizer's neighbour search: the AVX2 kernel picks the same
 * candidate as the scalar scan (random costs of every magnitude, zeros,
 * ties, infinities, NaNs; every list length up to 256). */
DS4_TEST(quant_iq2_nearest_avx2_same_choice) {
    if (ds4_quant_simd_best() < DS4_SIMD_AVX2) {
        TEST_SKIP("no AVX2");
    }
    rng_seed(77);
    uint16_t u[256 + 8];
    float cost[32];
    for (int trial = 0; trial < 20000; trial++) {
        int n = 1 + (int)(rng_u64() % 256), kind = trial % 7;
        for (int i = 0; i < 256 + 8; i++) u[i] = (uint16_t)rng_u64();
        if (kind == 6) /* few distinct candidates: many exact ties */
            for (int i = 0; i < 256 + 8; i++) u[i] &= 0x0103;
        for (int i = 0; i < 32; i++) {
            float g = rng_gauss();
            cost[i] = kind == 0   ? g * g
                      : kind == 1 ? 1e30f * g * g
                      : kind == 2 ? 1e-40f * g * g
                      : kind == 3 ? (rng_unit() < 0.3f ? 0.0f : g * g)
                      : kind == 4 ? (rng_unit() < 0.05f ? INFINITY : 1e37f * g * g)
                      : kind == 5 ? (rng_unit() < 0.05f ? NAN : g * g)
                                  : (float)(int)(4 * g * g);
        }
        int a = ds4_iq2_nearest_scalar(u, n, cost), b = ds4_iq2_nearest_avx2(u, n, cost);
        CHECK_MSG(a == b, "trial %d (n %d): scalar %d, avx2 %d", trial, n, a, b);
    }
}

/* ---- quantizer regression: hashes pinned from the reference code ----------- */

/* Approximately normal from exact float operations only (a sum of four
 * uniforms), so the inputs are the same on every libm. */
static float reg_gauss(void) { return (rng_unit() + rng_unit() + rng_unit() + rng_unit() - 2.0f) * 1.7320508f; }

/* One input value of distribution `dist` at flat position i of its row. */
static float reg_value(int dist, int i) {
    float g = reg_gauss();
    switch (dist) {
    case 0: return 0.02f * g;                                /* converter-like weights */
    case 1: return 0.0f;                                     /* all zeros */
    case 2: return (i / 64) % 2 ? 0.5f : -0.25f;             /* constant runs */
    case 3: return rng_unit() < 0.05f ? g : 0.0f;            /* sparse */
    case 4: return 1e30f * g;                                /* huge */
    case 5: return 1e-30f * g;                               /* tiny (subnormal products) */
    case 6: return g * g * g * g * g;                        /* heavy tails */
    default: return (float)(int)(4 * g) + ((i % 32) == 7 ? 100 * g : 0); /* ties, one outlier per group */
    }
}

/* Quantizes 8 distributions x 3 kinds of importance (none, uniform,
 * sparse with zeros) x 128 rows of 256 values, 16 rows per importance
 * vector, and hashes the bytes (FNV-1a, with each call's return code).
 * The expected values come from the quantizers before their speed-up
 * (commit 80e9005, byte-identical to ggml on the golden set above); a
 * faster search must keep every byte. Since 2026-12-06 rows no block type
 * can represent are refused (|x| > 1e9: F16 block scales overflow, and the
 * searches' squares; the blocks of the huge distribution decoded as inf /
 * NaN or garbage before), so those entries hash refusals. */
DS4_TEST(quant_quantizers_regression_hashes) {
    enum { N = 256, R = 128, CHUNK = 16 };
    static const int types[3] = {DS4_TYPE_IQ2_XXS, DS4_TYPE_Q2_K, DS4_TYPE_Q4_K};
    static const uint64_t want[3][8][3] = {
        {/* IQ2_XXS */
         {0x73685af0fc82df19ull, 0x9897d810b5980d7cull, 0x6d275f9e57039a69ull},
         {0xa9c2ccf67ee0cdc5ull, 0xa9c2ccf67ee0cdc5ull, 0xa9c2ccf67ee0cdc5ull},
         {0xfdf726846a9635c5ull, 0x4576ff0f763e8a25ull, 0x2654a36bafe307e5ull},
         {0xdd71b0bdbdf428c9ull, 0x13590322476352e8ull, 0xf391156b5eb3f620ull},
         {0x092de9d90bd4d125ull, 0x092de9d90bd4d125ull, 0x092de9d90bd4d125ull}, /* refused: |x| ~1e30 */
         {0xa9c2ccf67ee0cdc5ull, 0xa9c2ccf67ee0cdc5ull, 0xa9c2ccf67ee0cdc5ull},
         {0x73b548a0bfe4ba97ull, 0x0a46e800eff3364aull, 0x7025817b2287cc40ull},
         {0xabddb269dfcb7055ull, 0xc3000ac95a9b13cbull, 0x132532e766e72f7aull},
        },
        {/* Q2_K */
         {0x450c33f719540f19ull, 0x9d8d5a0d6e79ec48ull, 0x99f85b88448bc3b0ull},
         {0x08f896342e5581c5ull, 0x08f896342e5581c5ull, 0x08f896342e5581c5ull},
         {0x242ff9339aa45dc5ull, 0x242ff9339aa45dc5ull, 0x242ff9339aa45dc5ull},
         {0x229ad1ac9787792dull, 0x61fea5ae84830deaull, 0x5f099e553fff21b5ull},
         {0x092de9d90bd4d125ull, 0x092de9d90bd4d125ull, 0x092de9d90bd4d125ull}, /* refused: |x| ~1e30 */
         {0x45ba83fa796acedbull, 0x80105bce6c1c3877ull, 0xa2c1ce75de102a78ull},
         {0xcd3ccb7a3b5e2b35ull, 0x1a36085c2a8d7b06ull, 0x2e9d563dbca5bf93ull},
         {0xfffb39651d82ceadull, 0x8fa870702b561e0aull, 0x08c63604d3e2dcd7ull},
        },
        {/* Q4_K */
         {0x3b38a329747d2481ull, 0x9bd0e6e6bf6bf3deull, 0x821c512bb1239cb8ull},
         {0x2628d469d1ffd9c5ull, 0x2628d469d1ffd9c5ull, 0x2628d469d1ffd9c5ull},
         {0xec3acc16a23b62c5ull, 0xec3acc16a23b62c5ull, 0xec3acc16a23b62c5ull},
         {0x20d02b992588d573ull, 0x211e2c57fd047ac7ull, 0x29efcf218dfda6fbull},
         {0x092de9d90bd4d125ull, 0x092de9d90bd4d125ull, 0x092de9d90bd4d125ull}, /* refused: |x| ~1e30 */
         {0xa976ffe725aaffa1ull, 0xd110e090677174adull, 0xa0fac110b81972f1ull},
         {0xed4330784629d42cull, 0x556e15d465a71e72ull, 0x0e5b51c2c72f7e38ull},
         {0xc9ba9e0a4e699d1aull, 0x028ec39d9f465982ull, 0x6661713676cc3ab4ull},
        },
    };
    float *x = malloc(CHUNK * N * sizeof *x), imp[N];
    uint8_t *q = malloc(CHUNK * N * 4);
    for (int ti = 0; ti < 3; ti++)
        for (int d = 0; d < 8; d++)
            for (int w = 0; w < 3; w++) {
                rng_seed((uint64_t)(1000 + 100 * ti + 10 * d + w));
                uint64_t h = 14695981039346656037ull;
                for (int c = 0; c < R / CHUNK; c++) {
                    for (int i = 0; i < CHUNK * N; i++) x[i] = reg_value(d, i % N);
                    for (int i = 0; i < N; i++)
                        imp[i] = w == 1 ? rng_unit() : (rng_unit() < 0.2f ? 0.0f : 1e-3f * rng_unit() * rng_unit());
                    int rc = ds4_quantize_rows(types[ti], x, q, CHUNK, N, w ? imp : NULL, NULL);
                    size_t nb = rc ? 0 : CHUNK * ds4_type_row_bytes(types[ti], N);
                    h = (h ^ (uint8_t)rc) * 1099511628211ull;
                    for (size_t k = 0; k < nb; k++) h = (h ^ q[k]) * 1099511628211ull;
                }
                CHECK_MSG(h == want[ti][d][w], "%s dist %d imp %d: hash 0x%016llxull", ds4_type_name(types[ti]), d, w,
                          (unsigned long long)h);
            }
    free(x);
    free(q);
}

/* ---- byte-exactness against ggml ------------------------------------------ */

static void *read_file(const char *rel, size_t *len) {
    char path[256];
    snprintf(path, sizeof path, "quant_golden/%s", rel);
    FILE *f = fopen(ds4_test_path(path), "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *p = malloc((size_t)n);
    if (fread(p, 1, (size_t)n, f) != (size_t)n) {
        free(p);
        p = NULL;
    }
    fclose(f);
    *len = (size_t)n;
    return p;
}

/* Our quantizers reproduce ggml's bytes (tests/data/quant_golden/README.txt). */
DS4_TEST(quant_quantizers_match_ggml_golden_bytes) {
    enum { R = 4, N = 1024 };
    static const struct { int type; const char *name; } types[] = {
        {DS4_TYPE_Q8_0, "q8_0"}, {DS4_TYPE_Q4_K, "q4_K"}, {DS4_TYPE_Q2_K, "q2_K"}, {DS4_TYPE_IQ2_XXS, "iq2_xxs"}};
    static const char *dists[] = {"gauss", "heavy"};
    uint8_t *q = malloc(R * N * 2);
    for (int d = 0; d < 2; d++) {
        char name[128];
        size_t nx, ni;
        snprintf(name, sizeof name, "%s_input.f32", dists[d]);
        float *x = read_file(name, &nx);
        snprintf(name, sizeof name, "%s_imatrix.f32", dists[d]);
        float *imp = read_file(name, &ni);
        CHECK(x && imp && nx == R * N * 4 && ni == N * 4);
        for (int ti = 0; ti < 4; ti++)
            for (int w = 0; w < 2; w++) {
                if (types[ti].type == DS4_TYPE_IQ2_XXS && !w) continue;
                size_t ng;
                snprintf(name, sizeof name, "%s_%s_%s.bin", dists[d], types[ti].name, w ? "imatrix" : "plain");
                uint8_t *golden = read_file(name, &ng);
                CHECK_MSG(golden != NULL, "missing %s", name);
                CHECK_EQ_INT(ng, R * ds4_type_row_bytes(types[ti].type, N));
                CHECK_EQ_INT(ds4_quantize_rows(types[ti].type, x, q, R, N, w ? imp : NULL, NULL), 0);
                size_t first = 0;
                while (first < ng && q[first] == golden[first]) first++;
                CHECK_MSG(first == ng, "%s: first differing byte at %zu", name, first);
                free(golden);
            }
        free(x);
        free(imp);
    }
    free(q);
}

/* The CUDA int8 path (src/cuda/quant.cuh cu_iq2_signed4) signs IQ2_XXS grid
 * bytes as (g ^ m) + (m & 0x01010101) with a plain 32-bit add, m the byte
 * masks of ksigns: exact only because no grid byte is 0 (no carry crosses a
 * byte). Checked here for every grid entry and sign pattern against the
 * byte-wise definition (g, or -g where the sign bit is set). */
DS4_TEST(quant_iq2xxs_signed_bytes_by_xor_add_are_exact) {
    for (int gi = 0; gi < 256; gi++) {
        const uint64_t g = ds4_iq2xxs_grid[gi];
        for (int si = 0; si < 128; si++) {
            const uint32_t signs = ds4_ksigns_iq2xs[si];
            /* the computed form of the sign byte (quant.cuh CU_IQ2_SIGNS 3):
             * the 7 bits and their parity, so that the negatives are even */
            CHECK_EQ_INT((int64_t)(si | (__builtin_popcount((unsigned)si) & 1) << 7), (int64_t)signs);
            uint64_t m = 0;
            for (int b = 0; b < 8; b++)
                if ((signs >> b) & 1u) m |= (uint64_t)0xff << (8 * b);
            for (int h = 0; h < 2; h++) {
                const uint32_t gh = (uint32_t)(g >> (32 * h)), mh = (uint32_t)(m >> (32 * h));
                /* the register form of the mask (quant.cuh CU_IQ2_SIGNS 2) is the same */
                CHECK_EQ_INT((int64_t)((((signs >> (4 * h)) & 15u) * 0x00204081u & 0x01010101u) * 0xffu), (int64_t)mh);
                const uint32_t v = (gh ^ mh) + (mh & 0x01010101u);
                for (int b = 0; b < 4; b++) {
                    const int mag = (int)((gh >> (8 * b)) & 0xff);
                    const int want = (signs >> (4 * h + b)) & 1u ? -mag : mag;
                    const int got = (int8_t)(uint8_t)(v >> (8 * b));
                    CHECK(mag > 0);
                    CHECK_EQ_INT(got, want);
                }
            }
        }
    }
}
