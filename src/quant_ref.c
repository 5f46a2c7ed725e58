/* quant_ref.c - the reference quantizers of docs/FORMATS.md §C: Q8_0, Q4_K, Q2_K
 * (plain and importance-weighted) and IQ2_XXS (importance-weighted).
 *
 * They reproduce ggml's reference quantizers byte for byte, which needs:
 * the same binary32 operations in the same order (the build uses
 * -ffp-contract=off and no fast-math), nearest_int's round-half-to-even,
 * the f16 re-read of block scales, and the uint8 wrap-around of levels
 * where the reference stores ints into bytes. So this file stays scalar,
 * and expressions keep the reference's association order: a*b*c is (a*b)*c.
 *
 * Thread-safety: the IQ2_XXS search tables are built once (pthread_once)
 * and only read afterwards; everything else works on caller memory/stack.
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>

#include "quant_impl.h"

#define GROUP_MAX_EPS 1e-15f

/* ---- C.1 Q8_0 -------------------------------------------------------------- */

/* d = amax/127, q = roundf(x/d) (ties away from zero) using the reciprocal of
 * the unrounded d; d is stored as f16. */
void ds4_quant_ref_q8_0(const float *x, void *dst, int64_t n) {
    for (int64_t b = 0; b < n / DS4_QK8_0; b++) {
        const float *xb = x + b * DS4_QK8_0;
        ds4_block_q8_0 o;
        float amax = 0.0f;
        for (int i = 0; i < DS4_QK8_0; i++) {
            float v = fabsf(xb[i]);
            amax = amax > v ? amax : v;
        }
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        /* d below ~2.9e-39 (its f16 is 0: the block decodes to zeros): 1/d is
         * inf and x*id inf or NaN, whose int8 conversion is undefined */
        if (!isfinite(id)) id = 0.0f;
        o.d = ds4_f32_to_f16(d);
        for (int i = 0; i < DS4_QK8_0; i++) o.qs[i] = (int8_t)roundf(xb[i] * id);
        memcpy((uint8_t *)dst + (size_t)b * sizeof o, &o, sizeof o);
    }
}

/* ---- C.2 helper searches -------------------------------------------------- */

/* make_qkx2 / make_qkx3 (C.2): fit x ~= scale*L + min with L in [0, nmax] and
 * min <= 0, minimizing sum w*|err| (use_mad) or sum w*err^2. Writes L[n],
 * stores -min in *the_min and returns scale. `v3` selects qkx3's degenerate
 * test (max <= min) and level rule; the weights are always given here. */
static float make_qkx(int n, int nmax, const float *x, const float *w, uint8_t *L, float *the_min,
                      float rmin, float rdelta, int nstep, int use_mad, int v3) {
    uint8_t Laux[32];
    float min = x[0], max = x[0];
    float sum_w = w[0], sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (min > 0) min = 0;
    if (v3 ? max <= min : max == min) {
        memset(L, 0, (size_t)n);
        *the_min = -min;
        return 0.0f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best = 0;
    for (int i = 0; i < n; i++) {
        int l = nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)(l < 0 ? 0 : l > nmax ? nmax : l);
        float diff = scale * L[i] + min - x[i];
        diff = use_mad ? fabsf(diff) : diff * diff;
        best += w[i] * diff;
    }
    if (nstep < 1) {
        *the_min = -min;
        return scale;
    }
    uint8_t Lprev[32];
    for (int is = 0; is <= nstep; is++) {
        /* `min` is the best offset so far (updated below); max stays. */
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        for (int i = 0; i < n; i++) {
            int l;
            if (v3) {
                float v = iscale * (x[i] - min);
                l = v > 0 ? nearest_int(v < nmax ? v : (float)nmax) : 0;
            } else {
                l = nearest_int(iscale * (x[i] - min));
                l = l < 0 ? 0 : l > nmax ? nmax : l;
            }
            Laux[i] = (uint8_t)l;
        }
        /* Everything below is a function of Laux alone. Levels equal to the
         * previous step's give the same cost, which cannot be below `best`
         * now: that step either set best to it or found it not smaller,
         * and best has not changed since. So the step is skipped. */
        if (is > 0 && !memcmp(Laux, Lprev, (size_t)n)) continue;
        memcpy(Lprev, Laux, (size_t)n);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; i++) {
            int l = Laux[i];
            sum_l += w[i] * l;
            sum_l2 += w[i] * l * l;
            sum_xl += w[i] * l * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur = 0;
            for (int i = 0; i < n; i++) {
                float diff = this_scale * Laux[i] + this_min - x[i];
                diff = use_mad ? fabsf(diff) : diff * diff;
                cur += w[i] * diff;
            }
            if (cur < best) {
                memcpy(L, Laux, (size_t)n);
                best = cur;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

/* make_qp (C.2): fit x >= 0 as scale*L with L in [0, nmax], weights qw.
 * L is a byte array: negative levels wrap, and the refinement passes use the
 * wrapped byte, exactly as the reference does. */
static float make_qp(int n, int nmax, const float *x, uint8_t *L, const float *qw) {
    float max = 0;
    for (int i = 0; i < n; i++) max = max > x[i] ? max : x[i];
    if (max < GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.0f;
    }
    float iscale = nmax / max;
    for (int i = 0; i < n; i++) L[i] = (uint8_t)nearest_int(iscale * x[i]);
    float scale = 1 / iscale;
    float best = 0;
    for (int i = 0; i < n; i++) {
        float diff = x[i] - scale * L[i];
        best += qw[i] * diff * diff;
    }
    for (int is = -4; is <= 4; is++) {
        if (is == 0) continue;
        float iscale_is = (0.1f * is + nmax) / max;
        float scale_is = 1 / iscale_is;
        float mse = 0;
        for (int i = 0; i < n; i++) {
            int l = nearest_int(iscale_is * x[i]);
            l = l < nmax ? l : nmax;
            float diff = x[i] - scale_is * l;
            mse += qw[i] * diff * diff;
        }
        if (mse < best) {
            best = mse;
            iscale = iscale_is;
        }
    }
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        int l = nearest_int(iscale * x[i]);
        l = l < nmax ? l : nmax;
        L[i] = (uint8_t)l;
        sumlx += qw[i] * x[i] * l;
        suml2 += qw[i] * l * l;
    }
    for (int itry = 0; itry < 5; itry++) {
        int n_changed = 0;
        for (int i = 0; i < n; i++) {
            float w = qw[i];
            float slx = sumlx - w * x[i] * L[i];
            float sl2 = suml2 - w * L[i] * L[i];
            if (slx > 0 && sl2 > 0) {
                int new_l = nearest_int(x[i] * sl2 / slx);
                new_l = new_l < nmax ? new_l : nmax;
                if (new_l != L[i]) {
                    slx += w * x[i] * new_l;
                    sl2 += w * new_l * new_l;
                    if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (uint8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed++;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* ---- C.3 Q4_K ---------------------------------------------------------------- */

static void q4k_pack_scales(uint8_t s[12], const uint8_t ls[8], const uint8_t lm[8]) {
    for (int j = 0; j < 8; j++) {
        if (j < 4) {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (uint8_t)((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
            s[j - 4] |= (uint8_t)((ls[j] >> 4) << 6);
            s[j] |= (uint8_t)((lm[j] >> 4) << 6);
        }
    }
}

/* Steps 5-6 of C.3: final levels with the f16-rounded d/dmin, then nibbles.
 * Sub-blocks whose scale decodes to 0 keep the levels already in L. */
static void q4k_finish(ds4_block_q4_k *y, const float *x, uint8_t L[DS4_QK_K]) {
    float d = ds4_f16_to_f32(y->d), dmin = ds4_f16_to_f32(y->dmin);
    for (int j = 0; j < 8; j++) {
        int sc, m;
        if (j < 4) {
            sc = y->scales[j] & 63;
            m = y->scales[j + 4] & 63;
        } else {
            sc = (y->scales[j + 4] & 0xF) | ((y->scales[j - 4] >> 6) << 4);
            m = (y->scales[j + 4] >> 4) | ((y->scales[j] >> 6) << 4);
        }
        const float dd = d * sc;
        if (!dd) continue;
        const float dm = dmin * m;
        for (int ii = 0; ii < 32; ii++) {
            int l = nearest_int((x[32 * j + ii] + dm) / dd);
            L[32 * j + ii] = (uint8_t)(l < 0 ? 0 : l > 15 ? 15 : l);
        }
    }
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++)
            y->qs[32 * c + l] = (uint8_t)(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
}

void ds4_quant_ref_q4_k(const float *x, void *dst, int64_t n, const float *qw) {
    for (int64_t b = 0; b < n / DS4_QK_K; b++, x += DS4_QK_K) {
        ds4_block_q4_k y;
        uint8_t L[DS4_QK_K], ls[8], lm[8];
        float w[32], scales[8], mins[8];
        if (!qw) {
            float max_scale = 0, max_min = 0;
            for (int j = 0; j < 8; j++) {
                float sum_x2 = 0;
                for (int l = 0; l < 32; l++) sum_x2 += x[32 * j + l] * x[32 * j + l];
                float av_x = sqrtf(sum_x2 / 32);
                for (int l = 0; l < 32; l++) w[l] = av_x + fabsf(x[32 * j + l]);
                scales[j] = make_qkx(32, 15, x + 32 * j, w, L + 32 * j, &mins[j], -1.f, 0.1f, 20, 0, 0);
                if (scales[j] > max_scale) max_scale = scales[j];
                if (mins[j] > max_min) max_min = mins[j];
            }
            float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
            float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
            for (int j = 0; j < 8; j++) {
                uint8_t a = (uint8_t)nearest_int(inv_scale * scales[j]);
                uint8_t m = (uint8_t)nearest_int(inv_min * mins[j]);
                ls[j] = a < 63 ? a : 63;
                lm[j] = m < 63 ? m : 63;
            }
            q4k_pack_scales(y.scales, ls, lm);
            y.d = ds4_f32_to_f16(max_scale / 63.f);
            y.dmin = ds4_f32_to_f16(max_min / 63.f);
        } else {
            const float *qwb = qw + b * DS4_QK_K;
            float sw[8], sum_x2 = 0;
            for (int l = 0; l < DS4_QK_K; l++) sum_x2 += x[l] * x[l];
            float sigma2 = 2 * sum_x2 / DS4_QK_K;
            for (int j = 0; j < 8; j++) {
                for (int l = 0; l < 32; l++)
                    w[l] = qwb[32 * j + l] * sqrtf(sigma2 + x[32 * j + l] * x[32 * j + l]);
                float sumw = 0;
                for (int l = 0; l < 32; l++) sumw += w[l];
                sw[j] = sumw;
                scales[j] = make_qkx(32, 15, x + 32 * j, w, L + 32 * j, &mins[j], -0.9f, 0.05f, 36, 0, 1);
            }
            float d_block = make_qp(8, 63, scales, ls, sw);
            float m_block = make_qp(8, 63, mins, lm, sw);
            q4k_pack_scales(y.scales, ls, lm);
            y.d = ds4_f32_to_f16(d_block);
            y.dmin = ds4_f32_to_f16(m_block);
        }
        q4k_finish(&y, x, L);
        memcpy((uint8_t *)dst + (size_t)b * sizeof y, &y, sizeof y);
    }
}

/* ---- C.4 Q2_K ---------------------------------------------------------------- */

/* Step 5-6 of C.4 with the re-read f16 d and dmin. */
static void q2k_finish(ds4_block_q2_k *y, const float *x, uint8_t L[DS4_QK_K], float dm, float mm) {
    for (int j = 0; j < 16; j++) {
        const float d = dm * (y->scales[j] & 0xF);
        if (!d) continue;
        const float m = mm * (y->scales[j] >> 4);
        for (int ii = 0; ii < 16; ii++) {
            int l = nearest_int((x[16 * j + ii] + m) / d);
            L[16 * j + ii] = (uint8_t)(l < 0 ? 0 : l > 3 ? 3 : l);
        }
    }
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 32; l++) {
            const uint8_t *Lh = L + 128 * h + l;
            y->qs[32 * h + l] = (uint8_t)(Lh[0] | (Lh[32] << 2) | (Lh[64] << 4) | (Lh[96] << 6));
        }
}

void ds4_quant_ref_q2_k(const float *x, void *dst, int64_t n, const float *qw) {
    for (int64_t b = 0; b < n / DS4_QK_K; b++, x += DS4_QK_K) {
        ds4_block_q2_k y;
        uint8_t L[DS4_QK_K];
        float w[16], scales[16], mins[16];
        if (!qw) {
            float max_scale = 0, max_min = 0;
            for (int j = 0; j < 16; j++) {
                for (int l = 0; l < 16; l++) w[l] = fabsf(x[16 * j + l]);
                scales[j] = make_qkx(16, 3, x + 16 * j, w, L + 16 * j, &mins[j], -0.5f, 0.1f, 15, 1, 0);
                if (scales[j] > max_scale) max_scale = scales[j];
                if (mins[j] > max_min) max_min = mins[j];
            }
            if (max_scale > 0) {
                float iscale = 15.f / max_scale;
                for (int j = 0; j < 16; j++) y.scales[j] = (uint8_t)nearest_int(iscale * scales[j]);
                y.d = ds4_f32_to_f16(max_scale / 15.f);
            } else {
                memset(y.scales, 0, 16);
                y.d = ds4_f32_to_f16(0.f);
            }
            if (max_min > 0) {
                float iscale = 15.f / max_min;
                for (int j = 0; j < 16; j++)
                    y.scales[j] |= (uint8_t)((unsigned)nearest_int(iscale * mins[j]) << 4);
                y.dmin = ds4_f32_to_f16(max_min / 15.f);
            } else {
                y.dmin = ds4_f32_to_f16(0.f);
            }
        } else {
            const float *qwb = qw + b * DS4_QK_K;
            float sw[16], sum_x2 = 0;
            uint8_t Ls[16], Lm[16];
            for (int l = 0; l < DS4_QK_K; l++) sum_x2 += x[l] * x[l];
            float sigma2 = sum_x2 / DS4_QK_K;
            for (int j = 0; j < 16; j++) {
                for (int l = 0; l < 16; l++)
                    w[l] = qwb[16 * j + l] * sqrtf(sigma2 + x[16 * j + l] * x[16 * j + l]);
                sw[j] = 0;
                for (int l = 0; l < 16; l++) sw[j] += w[l];
                scales[j] = make_qkx(16, 3, x + 16 * j, w, L + 16 * j, &mins[j], -0.9f, 0.05f, 36, 0, 1);
            }
            float dm = make_qp(16, 15, scales, Ls, sw);
            float mm = make_qp(16, 15, mins, Lm, sw);
            y.d = ds4_f32_to_f16(dm);
            y.dmin = ds4_f32_to_f16(mm);
            for (int j = 0; j < 16; j++) y.scales[j] = (uint8_t)(Ls[j] | (Lm[j] << 4));
        }
        q2k_finish(&y, x, L, ds4_f16_to_f32(y.d), ds4_f16_to_f32(y.dmin));
        memcpy((uint8_t *)dst + (size_t)b * sizeof y, &y, sizeof y);
    }
}

/* ---- C.5 IQ2_XXS ---------------------------------------------------------- */

enum { IQ2_MAP_SIZE = 43692 }; /* 2-bit index u <= 0xAAAA, plus one */

/* Search tables (C.5), built once by iq2_init and read-only afterwards:
 * grid[k] bytes = odd coordinates 2l+1 of grid point k; map[u] = k when u is
 * on the grid, else -(offset of its neighbour list + 1) into neighbours,
 * whose list is a count followed by grid indices (two distance shells). */
static uint64_t iq2_grid[256];
static int iq2_map[IQ2_MAP_SIZE];
static uint16_t *iq2_neighbours;
/* iq2_neighbour_u[p] = the 2-bit level word (kgrid) of the grid index at
 * iq2_neighbours[p] (same offsets; count slots hold 0), plus 8 zero words of
 * padding for the 8-wide cost kernel's last load. */
static uint16_t *iq2_neighbour_u;
static int (*iq2_nearest)(const uint16_t *u, int n, const float cost[32]);
static pthread_once_t iq2_once = PTHREAD_ONCE_INIT;

/* Fills nb[] with the grid points of the two smallest distinct squared
 * distances from point u (coordinates 2l+1), ordered by distance, then by
 * grid index; returns how many. Distances are small integers, so two scans
 * replace the sort of the reference (same order). */
static int iq2_shells(int u, uint16_t nb[256]) {
    int d2[256], m1 = 1 << 30, m2 = 1 << 30, len = 0;
    for (int k = 0; k < 256; k++) {
        int d = 0;
        for (int j = 0; j < 8; j++) {
            int p = 2 * ((u >> (2 * j)) & 3) + 1, g = (int)((iq2_grid[k] >> (8 * j)) & 0xff);
            d += (g - p) * (g - p);
        }
        d2[k] = d;
        if (d < m1) m2 = m1, m1 = d;
        else if (d > m1 && d < m2) m2 = d;
    }
    for (int k = 0; k < 256; k++)
        if (d2[k] == m1) nb[len++] = (uint16_t)k;
    for (int k = 0; k < 256; k++)
        if (d2[k] == m2) nb[len++] = (uint16_t)k;
    return len;
}

/* Builds the tables. Only points with every level in 0..2 get neighbour
 * lists: the search clamps levels to 0..2, so no other index is looked up
 * (their map entry stays IQ2_UNREACHABLE). */
#define IQ2_UNREACHABLE (-0x7fffffff)
static void iq2_init(void) {
    uint16_t nb[256];
    for (int k = 0; k < 256; k++) {
        uint64_t g = 0;
        for (int j = 0; j < 8; j++) g |= (uint64_t)(2 * ((ds4_iq2xxs_kgrid[k] >> (2 * j)) & 3) + 1) << (8 * j);
        iq2_grid[k] = g;
    }
    for (int u = 0; u < IQ2_MAP_SIZE; u++) iq2_map[u] = IQ2_UNREACHABLE;
    for (int k = 0; k < 256; k++) iq2_map[ds4_iq2xxs_kgrid[k]] = k;
    /* 6561 points with levels 0..2, each list at most 1 + 256 entries */
    enum { N_POINTS = 6561 };
    iq2_neighbours = malloc((size_t)N_POINTS * 257 * sizeof *iq2_neighbours);
    if (!iq2_neighbours) ds4_quant_fatal("iq2_xxs: no memory for the neighbour table");
    int pos = 0;
    for (int t = 0; t < N_POINTS; t++) {
        int u = 0;
        for (int j = 0, v = t; j < 8; j++, v /= 3) u |= (v % 3) << (2 * j);
        if (iq2_map[u] >= 0) continue;
        int len = iq2_shells(u, nb);
        iq2_map[u] = -(pos + 1);
        iq2_neighbours[pos++] = (uint16_t)len;
        memcpy(iq2_neighbours + pos, nb, (size_t)len * sizeof nb[0]);
        pos += len;
    }
    uint16_t *shrunk = realloc(iq2_neighbours, (size_t)pos * sizeof *iq2_neighbours);
    if (shrunk) iq2_neighbours = shrunk;
    iq2_neighbour_u = calloc((size_t)pos + 8, sizeof *iq2_neighbour_u);
    if (!iq2_neighbour_u) ds4_quant_fatal("iq2_xxs: no memory for the neighbour table");
    for (int p = 0; p < pos; p += iq2_neighbours[p] + 1)
        for (int j = 1; j <= iq2_neighbours[p]; j++) iq2_neighbour_u[p + j] = ds4_iq2xxs_kgrid[iq2_neighbours[p + j]];
    iq2_nearest = ds4_quant_simd_best() >= DS4_SIMD_AVX2 ? ds4_iq2_nearest_avx2 : ds4_iq2_nearest_scalar;
}

int ds4_iq2_nearest_scalar(const uint16_t *u, int n, const float cost[32]) {
    float best_d2 = FLT_MAX;
    int best_j = -1;
    for (int j = 0; j < n; j++) {
        float d2 = 0;
        for (int i = 0; i < 8; i++) d2 += cost[4 * i + ((u[j] >> (2 * i)) & 3)];
        if (d2 < best_d2) {
            best_d2 = d2;
            best_j = j;
        }
    }
    return best_j;
}

/* Projects levels L[0..8) (0..2) onto the grid: returns the grid index and,
 * when u is off the grid, replaces L by the best neighbour's levels under
 * cost sum waux*(scale*g - xval)^2 (first strictly smallest wins).
 * The per-coordinate terms waux[i]*(scale*q - xval[i])^2 take only three
 * values (q = 1, 3, 5), so they are computed once per call with the
 * reference's operations, and each neighbour's cost is the same sequential
 * float sum of the same terms: the chosen index is unchanged. */
static int iq2_project(int8_t *L, const float *xval, const float *waux, float scale) {
    int u = 0;
    for (int i = 0; i < 8; i++) u |= L[i] << (2 * i);
    int gi = iq2_map[u];
    if (gi >= 0) return gi;
    if (gi == IQ2_UNREACHABLE) ds4_quant_fatal("iq2_xxs: level index %#x out of range", (unsigned)u);
    int off = -iq2_map[u] - 1, n = iq2_neighbours[off];
    const uint16_t *nb = iq2_neighbours + off + 1;
    float cost[32]; /* cost[4i+l]: coordinate i at level l (q = 2l+1); l = 3 unused */
    static const float qv[4] = {1, 3, 5, 0};
    for (int i = 0; i < 8; i++)
        for (int l = 0; l < 4; l++) { /* l = 3 is never looked up */
            float diff = scale * qv[l] - xval[i];
            cost[4 * i + l] = waux[i] * diff * diff;
        }
    int best_j = iq2_nearest(iq2_neighbour_u + off + 1, n, cost);
    gi = best_j < 0 ? -1 : nb[best_j];
    if (gi < 0) ds4_quant_fatal("iq2_xxs: no neighbour found (non-finite input?)");
    for (int i = 0; i < 8; i++) L[i] = (int8_t)((ds4_iq2xxs_kgrid[gi] >> (2 * i)) & 3);
    return gi;
}

/* Levels of 32 values for inverse scale id, projected with scale s (C.5 e/f). */
static void iq2_levels(int8_t *L, const float *xval, const float *waux, float id, float s) {
    /* nearest_int written out over an int32 array, so the loop vectorizes */
    int32_t li[32];
    for (int i = 0; i < 32; i++) {
        float v = 0.5f * (id * xval[i] - 1) + 12582912.f;
        int32_t b;
        memcpy(&b, &v, 4);
        int32_t l = (b & 0x007fffff) - 0x00400000;
        l = l < 0 ? 0 : l;
        li[i] = l > 2 ? 2 : l;
    }
    for (int i = 0; i < 32; i++) L[i] = (int8_t)li[i];
    for (int k = 0; k < 4; k++) iq2_project(L + 8 * k, xval + 8 * k, waux + 8 * k, s);
}

/* One 32-value group (C.5 step 2): writes the two words (without the 4-bit
 * scale) and returns the group scale (>= 0). */
static float iq2_group(const float *xb, const float *qw, float sigma2, uint32_t q2[2]) {
    float weight[32], waux[32], xval[32];
    int8_t L[32], Laux[32];
    uint8_t signs[4];
    for (int i = 0; i < 32; i++) weight[i] = qw[i] * sqrtf(sigma2 + xb[i] * xb[i]);
    for (int i = 0; i < 32; i++) waux[i] = sqrtf(weight[i]);
    for (int k = 0; k < 4; k++) {
        int nflip = 0;
        uint8_t s = 0;
        for (int i = 0; i < 8; i++) {
            if (xb[8 * k + i] >= 0) {
                xval[8 * k + i] = xb[8 * k + i];
            } else {
                xval[8 * k + i] = -xb[8 * k + i];
                nflip++;
                s |= (uint8_t)(1 << i);
            }
        }
        if (nflip % 2) {
            /* odd count: flip the cheapest element so the parity is even */
            int imin = 0;
            float min = weight[8 * k] * xb[8 * k] * xb[8 * k];
            for (int i = 1; i < 8; i++) {
                float ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i];
                if (ax < min) {
                    min = ax;
                    imin = i;
                }
            }
            xval[8 * k + imin] = -xval[8 * k + imin];
            s ^= (uint8_t)(1 << imin);
        }
        signs[k] = s & 127;
    }
    float max = xval[0];
    for (int i = 1; i < 32; i++) max = max > xval[i] ? max : xval[i];
    q2[0] = q2[1] = 0;
    if (max < GROUP_MAX_EPS) return 0.0f;
    float scale = make_qp(32, 4, xval, (uint8_t *)L, weight);
    float eff_max = scale * 3;
    if (eff_max <= 0) return 0.0f;
    float best = 0;
    int8_t Lprev[32];
    for (int is = -6; is <= 6; is++) {
        float id = (5 + is * 0.1f) / eff_max;
        iq2_levels(Laux, xval, waux, id, 1 / id);
        /* The sums and the update below depend on Laux alone: levels equal
         * to the previous step's either fail the test again (best is
         * unchanged since) or rewrite scale, best and L with the values
         * they already hold. So the step is skipped. */
        if (is > -6 && !memcmp(Laux, Lprev, 32)) continue;
        memcpy(Lprev, Laux, 32);
        float sumqx = 0, sumq2 = 0;
        for (int i = 0; i < 32; i++) {
            float q = 2 * Laux[i] + 1;
            sumqx += weight[i] * xval[i] * q;
            sumq2 += weight[i] * q * q;
        }
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            memcpy(L, Laux, 32);
        }
    }
    if (scale > 0) {
        iq2_levels(L, xval, waux, 1 / scale, scale);
        float sumqx = 0, sumq2 = 0;
        for (int i = 0; i < 32; i++) {
            float q = 2 * L[i] + 1;
            sumqx += weight[i] * xval[i] * q;
            sumq2 += weight[i] * q * q;
        }
        if (sumq2 > 0) scale = sumqx / sumq2;
    }
    if (scale < 0) {
        scale = -scale;
        for (int k = 0; k < 4; k++) signs[k] = (uint8_t)(~signs[k] & 127);
    }
    for (int k = 0; k < 4; k++) {
        int u = 0;
        for (int i = 0; i < 8; i++) u |= L[8 * k + i] << (2 * i);
        if (u < 0 || u >= IQ2_MAP_SIZE || iq2_map[u] < 0)
            ds4_quant_fatal("iq2_xxs: levels %#x not on the grid", (unsigned)u);
        q2[0] |= (uint32_t)iq2_map[u] << (8 * k);
        q2[1] |= (uint32_t)signs[k] << (7 * k);
    }
    return scale;
}

void ds4_quant_ref_iq2_xxs(const float *x, void *dst, int64_t n, const float *qw) {
    pthread_once(&iq2_once, iq2_init);
    for (int64_t b = 0; b < n / DS4_QK_K; b++) {
        const float *xbl = x + b * DS4_QK_K;
        ds4_block_iq2_xxs y;
        uint32_t q2[16];
        float scales[8], max_scale = 0, sumx2 = 0;
        for (int i = 0; i < DS4_QK_K; i++) sumx2 += xbl[i] * xbl[i];
        float sigma2 = sumx2 / DS4_QK_K;
        for (int ib = 0; ib < 8; ib++) {
            scales[ib] = iq2_group(xbl + 32 * ib, qw + b * DS4_QK_K + 32 * ib, sigma2, q2 + 2 * ib);
            max_scale = max_scale > scales[ib] ? max_scale : scales[ib];
        }
        if (!max_scale) {
            y.d = ds4_f32_to_f16(0.f);
            memset(y.qs, 0, sizeof y.qs);
        } else {
            float d = max_scale / 31;
            y.d = ds4_f32_to_f16(d);
            float id = 1 / d;
            for (int ib = 0; ib < 8; ib++) {
                int l = nearest_int(0.5f * (id * scales[ib] - 1));
                l = l < 0 ? 0 : l > 15 ? 15 : l;
                q2[2 * ib + 1] |= (uint32_t)l << 28;
            }
            memcpy(y.qs, q2, sizeof y.qs);
        }
        memcpy((uint8_t *)dst + (size_t)b * sizeof y, &y, sizeof y);
    }
}
