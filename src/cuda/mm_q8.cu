/* mm_q8.cu - Q8_0 weights x Q8_0 activations for batches (prefill) on
 * the int8 tensor cores, each output with the decode kernels' operations
 * (matvec.cu), bit for bit. */
#include "cuda/cuda.cuh"
#include "cuda/mma.cuh"
#include "cuda/quant.cuh"

/* int8 mma (m16n8k32, one 32-value chunk per mma) gives each chunk's
 * integer dot exactly; the float work is laid out so that every output has
 * the operations of the decode kernels (cu_row_dot's order):
 *  - lane position L = 32j + lane of a row (WPR warps of 32 lanes; KL =
 *    32*WPR positions) accumulates acc_L += (d_w*d_a)*isum (unfused, as
 *    quant.c) over the chunks L, L + KL, L + 2KL, ... in that order (NK
 *    chunks at most);
 *  - each warp's 32 acc_L are summed by cu_warp_sum's butterfly; visiting
 *    the lanes in bit-reversed order (0, 16, 8, 24, ...) turns that
 *    butterfly into a binary counter, so partial sums stay in registers;
 *  - the WPR warp sums are added in j order (mv_rows_store).
 * Block tile 64 rows x 64 tokens, 4 x TW warps (16 rows x 64/TW tokens
 * each), the chunks staged through shared memory by cp.async in three
 * stages of 8 chunk slots (AP lane positions x NK chunks each).
 *
 * TW (DS4_CUDA_MM_TW, default 4; 2 on request): TW = 2 gives 8 warps of 16 x 32,
 * 228 registers (the counter's 5 levels x 16 values), one block and 8 warps
 * per SM (H100 Nsight, a 2,048-token chunk: 12.5% occupancy, 5.5 cycles per
 * issued instruction, latency-bound); TW = 4, 16 warps of 16 x 16: half the
 * registers per thread, twice the warps per SM; each warp's outputs have the
 * same operations in the same order, so the same bits.
 *
 * LDM (default; DS4_CUDA_MM_LDM=0 for the 32-bit loads): the A fragment of a chunk
 * and the B fragments of two token tiles by ldmatrix .x4 (mm_ldsm4) instead
 * of four and two 32-bit shared loads: the same words in the same
 * registers (mm_off keeps each 16-byte half of a row contiguous), fewer
 * instructions for an issue-bound kernel; the same bits by construction.
 * H100, q2:20, one 2,048-token chunk: mv_q8_0_i8 99.4 -> 98.7 ms (with
 * k_moe_mm's LDM: prefill 4,887-4,893 -> 4,943 tok/s). */
#define MM_STAGES 3
#define MM_SLOTS 8

template <int NK> struct mm_smem {
    int8_t a[MM_STAGES][MM_SLOTS][MM_BM * 32];
    int8_t b[MM_STAGES][MM_SLOTS][MM_BN * 32];
    /* one stripe (32 lane positions x NK chunks) of scales, two stripes in flight */
    uint16_t dw[2][MM_BM][32 * NK + 8];
    float da[2][MM_BN][32 * NK + 4];
};

template <int WPR, int NK, int TW, bool LDM>
__global__ void __launch_bounds__(128 * TW, 1) k_mm_q8(const __grid_constant__ mv_params p) {
    constexpr int NT = 128 * TW;           /* threads */
    constexpr int TPW = MM_BN / TW;        /* tokens per warp */
    constexpr int NA = TPW / 8;            /* mma token tiles per warp */
    constexpr int AP = MM_SLOTS / NK;      /* lane positions per stage */
    constexpr int QS = 32 / AP;            /* stages per stripe */
    constexpr int KL = 32 * WPR;
    constexpr int NS = WPR * QS;           /* stages */
    extern __shared__ __align__(16) unsigned char mm_raw[];
    mm_smem<NK> &sm = *reinterpret_cast<mm_smem<NK> *>(mm_raw);
    cu_pdl_wait();
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
    const int wm = warp & 3, wn = warp >> 2;
    const int row0 = blockIdx.x * MM_BM, t0 = blockIdx.y * MM_BN;
    int s = 0;
    while (s < p.n_seg && row0 >= p.seg_end[s]) s++;
    if (s >= p.n_seg) return;
    const cu_seg &sg = p.seg[s];
    const int r0 = row0 - (s ? p.seg_end[s - 1] : 0); /* MM_BM divides every segment (launcher) */
    const int8_t *aq = p.aq + sg.xoff;
    const float *ad = p.ad + sg.xoff / 32;

    /* stage st = (stripe j, quarter q): slot i*NK + k holds chunk
     * 32j + br5(AP*q + i) + KL*k; the stripe's scales come with q = 0 */
    auto issue = [&](int st) {
        const int j = st / QS, q = st % QS, buf = st % MM_STAGES;
#pragma unroll
        for (int u = 0; u < (MM_SLOTS * MM_BM * 2) / NT; u++) {
            const int v = tid + NT * u, half = v & 1, rr = (v >> 1) % MM_BM, slot = (v >> 1) / MM_BM;
            const int c = 32 * j + mm_br5(AP * q + slot / NK) + KL * (slot % NK);
            const bool ok = c < p.nch;
            const uint8_t *src = sg.w.q + (size_t)(r0 + rr) * sg.w.q_row + (size_t)(ok ? c : 0) * 32 + 16 * half;
            mm_cp16(sm.a[buf][slot] + mm_off(rr, 4 * half), src, ok);
        }
#pragma unroll
        for (int u = 0; u < (MM_SLOTS * MM_BN * 2) / NT; u++) {
            const int v = tid + NT * u, half = v & 1, tt = (v >> 1) % MM_BN, slot = (v >> 1) / MM_BN;
            const int c = 32 * j + mm_br5(AP * q + slot / NK) + KL * (slot % NK);
            const bool ok = c < p.nch && t0 + tt < p.n;
            const int8_t *src = aq + (ok ? (int64_t)(t0 + tt) * p.ldq + (int64_t)c * 32 + 16 * half : 0);
            mm_cp16(sm.b[buf][slot] + mm_off(tt, 4 * half), src, ok);
        }
        if (q == 0) {
            const int sb = j & 1;
            /* weight scales: 64 bytes (32 halves) per row per k */
            for (int v = tid; v < MM_BM * NK * 4; v += NT) {
                const int piece = v & 3, k = (v >> 2) % NK, rr = (v >> 2) / NK;
                const int c = 32 * j + KL * k;
                const bool ok = c < p.nch;
                const uint8_t *src = sg.w.s + (size_t)(r0 + rr) * sg.w.s_row + 2 * (size_t)(ok ? c : 0) + 16 * piece;
                mm_cp16(&sm.dw[sb][rr][32 * k + 8 * piece], src, ok);
            }
            /* activation scales: 128 bytes (32 floats) per token per k */
            for (int v = tid; v < MM_BN * NK * 8; v += NT) {
                const int piece = v & 7, k = (v >> 3) % NK, tt = (v >> 3) / NK;
                const int c = 32 * j + KL * k;
                const bool ok = c < p.nch && t0 + tt < p.n;
                const float *src = ad + (ok ? (int64_t)(t0 + tt) * (p.ldq / 32) + c + 4 * piece : 0);
                mm_cp16(&sm.da[sb][tt][32 * k + 4 * piece], src, ok);
            }
        }
    };

    float total[NA][4], lvl[5][NA][4], acc[NA][4];
#pragma unroll
    for (int a = 0; a < NA; a++)
#pragma unroll
        for (int e = 0; e < 4; e++) total[a][e] = 0.0f;
    issue(0);
    mm_commit();
    if (NS > 1) issue(1);
    mm_commit();
    const int ra = wm * 16 + g; /* this thread's rows ra, ra + 8 */
    for (int j = 0; j < WPR; j++) {
        const int sb = j & 1;
#pragma unroll
        for (int q = 0; q < QS; q++) {
            const int st = j * QS + q, buf = st % MM_STAGES;
            mm_wait<1>();
            __syncthreads();
            if (st + 2 < NS) issue(st + 2);
            mm_commit();
#pragma unroll
            for (int i = 0; i < AP; i++) {
                const int m = AP * q + i, cl = mm_br5(m);
#pragma unroll
                for (int a = 0; a < NA; a++)
#pragma unroll
                    for (int e = 0; e < 4; e++) acc[a][e] = 0.0f;
#pragma unroll
                for (int k = 0; k < NK; k++) {
                    const int8_t *A = sm.a[buf][i * NK + k], *B = sm.b[buf][i * NK + k];
                    unsigned af[4], bf[NA][2];
                    if (LDM) {
                        /* matrix lane >> 3: rows +8 (bit 0), the second 16 bytes (bit 1) */
                        const int mr = wm * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
                        mm_ldsm4(af, A + mm_off(mr, (lane >> 4) * 4));
#pragma unroll
                        for (int a = 0; a < NA; a += 2) {
                            /* matrix lane >> 3: the second 16 bytes (bit 0), tile a + 1 (bit 1) */
                            const int tr = wn * TPW + a * 8 + (lane >> 4) * 8 + (lane & 7);
                            unsigned r4[4];
                            mm_ldsm4(r4, B + mm_off(tr, ((lane >> 3) & 1) * 4));
                            bf[a][0] = r4[0], bf[a][1] = r4[1];
                            if (a + 1 < NA) bf[a + 1][0] = r4[2], bf[a + 1][1] = r4[3];
                        }
                    } else {
                        af[0] = *(const unsigned *)(A + mm_off(ra, tq));
                        af[1] = *(const unsigned *)(A + mm_off(ra + 8, tq));
                        af[2] = *(const unsigned *)(A + mm_off(ra, tq + 4));
                        af[3] = *(const unsigned *)(A + mm_off(ra + 8, tq + 4));
#pragma unroll
                        for (int a = 0; a < NA; a++) {
                            const int tb = wn * TPW + a * 8;
                            bf[a][0] = *(const unsigned *)(B + mm_off(tb + g, tq));
                            bf[a][1] = *(const unsigned *)(B + mm_off(tb + g, tq + 4));
                        }
                    }
                    const float dw0 = cu_h2f(sm.dw[sb][ra][cl + 32 * k]), dw1 = cu_h2f(sm.dw[sb][ra + 8][cl + 32 * k]);
#pragma unroll
                    for (int a = 0; a < NA; a++) {
                        const int tb = wn * TPW + a * 8;
                        int ci[4];
                        mm_mma(af, bf[a][0], bf[a][1], ci);
                        const float da0 = sm.da[sb][tb + 2 * tq][cl + 32 * k], da1 = sm.da[sb][tb + 2 * tq + 1][cl + 32 * k];
                        acc[a][0] = __fadd_rn(acc[a][0], __fmul_rn(__fmul_rn(dw0, da0), mm_i2f(ci[0])));
                        acc[a][1] = __fadd_rn(acc[a][1], __fmul_rn(__fmul_rn(dw0, da1), mm_i2f(ci[1])));
                        acc[a][2] = __fadd_rn(acc[a][2], __fmul_rn(__fmul_rn(dw1, da0), mm_i2f(ci[2])));
                        acc[a][3] = __fadd_rn(acc[a][3], __fmul_rn(__fmul_rn(dw1, da1), mm_i2f(ci[3])));
                    }
                }
                mm_counter_push(m, j, acc, lvl, total);
            }
        }
    }
    mm_wait<0>();
#pragma unroll
    for (int a = 0; a < NA; a++) {
        const int t = t0 + wn * TPW + a * 8 + 2 * tq;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int tt = t + (e & 1), rr = r0 + ra + (e >> 1) * 8;
            if (tt < p.n) sg.y[(int64_t)tt * sg.ldy + rr] = total[a][e];
        }
    }
}

/* The tensor-core path takes batches of at least MM_MIN_N tokens whose
 * segments are whole 64-row tiles, chunks per row a multiple of 32 and at
 * most 2 chunks per lane position (the shapes the tests cover: every Flash
 * projection; the output head, 4 chunks, stays on the matvec), rows
 * 16-byte aligned. */
static int mm_nk(const mv_params &p, int wpr) {
    if (p.n < MM_MIN_N || p.skip_le > 0 || !p.aq || p.nch % 32) return 0;
    for (int i = 0; i < p.n_seg; i++) {
        const cu_seg &g = p.seg[i];
        if (g.rows % MM_BM || g.w.q_row % 16 || g.w.s_row % 16 || (uintptr_t)g.w.q % 16 || (uintptr_t)g.w.s % 16 ||
            g.xoff % 512)
            return 0;
    }
    if ((uintptr_t)p.aq % 16 || (uintptr_t)p.ad % 16 || p.ldq % 512) return 0;
    const int nk = (p.nch + 32 * wpr - 1) / (32 * wpr);
    return nk <= 2 ? nk : 0;
}

template <int WPR, int NK, int TW, bool LDM> static void launch_mm_tw(cu_ctx *c, const mv_params &p, int rows) {
    const size_t smem = sizeof(mm_smem<NK>);
    /* per device, so on every launch (a batch kernel launch, not a decode step) */
    cudaFuncSetAttribute(k_mm_q8<WPR, NK, TW, LDM>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    cu_launch(c, k_mm_q8<WPR, NK, TW, LDM>, dim3(rows / MM_BM, cu_div_up(p.n, MM_BN)), 128 * TW, smem, p);
}

template <int WPR, int NK> static void launch_mm(cu_ctx *c, const mv_params &p, int rows) {
    if (c->mm_tw == 2) {
        if (c->mm_ldm) launch_mm_tw<WPR, NK, 2, true>(c, p, rows);
        else launch_mm_tw<WPR, NK, 2, false>(c, p, rows);
    } else if (c->mm_ldm) {
        launch_mm_tw<WPR, NK, 4, true>(c, p, rows);
    } else {
        launch_mm_tw<WPR, NK, 4, false>(c, p, rows);
    }
}

template <int WPR> static bool try_mm(cu_ctx *c, const mv_params &p, int rows) {
    switch (mm_nk(p, WPR)) {
    case 1: launch_mm<WPR, 1>(c, p, rows); return true;
    case 2: launch_mm<WPR, 2>(c, p, rows); return true;
    default: return false;
    }
}

bool cu_mm_q8(cu_ctx *c, const mv_params &p, int rows, int wpr) {
    if (c->no_mma) return false;
    switch (wpr) {
    case 1: return try_mm<1>(c, p, rows);
    case 2: return try_mm<2>(c, p, rows);
    case 4: return try_mm<4>(c, p, rows);
    case 8: return try_mm<8>(c, p, rows);
    default: return false;
    }
}

CU_TU_SWITCHES(cu_sw_mm_q8)
