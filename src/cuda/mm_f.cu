/* mm_f.cu - F16/BF16 weights x f32 activations for batches (prefill):
 * register-tiled CUDA-core kernel, each output with the decode kernels'
 * operations (matvec.cu), bit for bit. */
#include "cuda/cuda.cuh"
#include "cuda/mma.cuh"
#include "cuda/quant.cuh"

/* F16/BF16 weights x f32 activations for batches, on CUDA cores with the
 * operations of the decode kernels (cu_row_dot): each output's lane
 * position L accumulates, chunk by chunk (L, L + KL, ...), a sequential fma
 * chain over the chunk's 32 values, and the lane positions are summed by
 * the butterfly (bit-reversed arrival, as k_mm_q8) and the warps in j
 * order. The many independent chains of a tile run side by side: block
 * 64 rows x 64 tokens, each thread 4 rows x 4 tokens (rows rg + 8q, tokens
 * tg + 4q of its warp's 32 x 16), weights converted to f32 once into shared
 * memory. Stage: 4 chunk slots (AP lane positions x NK chunks).
 * TW (DS4_CUDA_MF_TW, default 2; 1 on request): TW = 1 gives 8 warps of 32 rows x 16
 * tokens (255 registers, one block and 8 warps per SM); TW = 2, 16 warps
 * of 32 x 8 (each thread 4 rows x 2 tokens): about half the registers,
 * twice the warps per SM; each output's operations are unchanged, so the
 * same bits. */
#define MF_SLOTS 4
#define MF_LD 36 /* floats per row of a slot (32 + 4: conflict-free float4 reads) */
struct mf_smem {
    float w[2][MF_SLOTS][MM_BM * MF_LD];
    float x[2][MF_SLOTS][MM_BN * MF_LD];
};

template <int WT, int WPR, int NK, int TW>
__global__ void __launch_bounds__(256 * TW, 1) k_mm_f(const __grid_constant__ mv_params p) {
    constexpr int AP = MF_SLOTS / NK, QS = 32 / AP, KL = 32 * WPR, NS = WPR * QS;
    constexpr int NT = 256 * TW, TB = 4 / TW, TPW = 16 / TW; /* threads, tokens per thread, per warp */
    constexpr int WU = MF_SLOTS * MM_BM * 4 / NT, XU = MF_SLOTS * MM_BN * 8 / NT;
    extern __shared__ __align__(16) unsigned char mf_raw[];
    mf_smem &sm = *reinterpret_cast<mf_smem *>(mf_raw);
    cu_pdl_wait();
    if (p.skip_le > 0 && (p.step->pos0 + p.step->n) / 4 <= p.skip_le) return;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int rg = lane >> 2, tg = lane & 3, wr = warp & 1, wt = warp >> 1;
    const int row0 = blockIdx.x * MM_BM, t0 = blockIdx.y * MM_BN;
    int s = 0;
    while (s < p.n_seg && row0 >= p.seg_end[s]) s++;
    if (s >= p.n_seg) return;
    const cu_seg &sg = p.seg[s];
    const int r0 = row0 - (s ? p.seg_end[s - 1] : 0);
    const float *xb = p.x + sg.xoff;
    /* weights: 64 rows x 4 slots x 4 pieces of 8 values, WU per thread */
    auto w_load = [&](int st, uint4 (&raw)[WU]) {
        const int j = st / QS, q = st % QS;
#pragma unroll
        for (int u = 0; u < WU; u++) {
            const int v = tid + NT * u, piece = v & 3, rr = (v >> 2) & 63, slot = v >> 8;
            const int c = 32 * j + mm_br5(AP * q + slot / NK) + KL * (slot % NK);
            raw[u] = c < p.nch ? *(const uint4 *)(sg.w.q + (size_t)(r0 + rr) * sg.w.q_row + (size_t)c * 64 + 16 * piece)
                               : make_uint4(0, 0, 0, 0);
        }
    };
    auto w_store = [&](int buf, const uint4 (&raw)[WU]) {
#pragma unroll
        for (int u = 0; u < WU; u++) {
            const int v = tid + NT * u, piece = v & 3, rr = (v >> 2) & 63, slot = v >> 8;
            const uint32_t wv[4] = {raw[u].x, raw[u].y, raw[u].z, raw[u].w};
            float f[8];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const uint16_t lo = (uint16_t)(wv[k] & 0xffff), hi = (uint16_t)(wv[k] >> 16);
                if constexpr (WT == DS4_TYPE_F16) {
                    f[2 * k] = cu_h2f(lo);
                    f[2 * k + 1] = cu_h2f(hi);
                } else {
                    f[2 * k] = __uint_as_float((uint32_t)lo << 16);
                    f[2 * k + 1] = __uint_as_float((uint32_t)hi << 16);
                }
            }
            float4 *d = (float4 *)&sm.w[buf][slot][rr * MF_LD + 8 * piece];
            d[0] = make_float4(f[0], f[1], f[2], f[3]);
            d[1] = make_float4(f[4], f[5], f[6], f[7]);
        }
    };
    /* activations: 64 tokens x 4 slots x 8 float4, by cp.async */
    auto x_issue = [&](int st, int buf) {
        const int j = st / QS, q = st % QS;
#pragma unroll
        for (int u = 0; u < XU; u++) {
            const int v = tid + NT * u, piece = v & 7, tt = (v >> 3) & 63, slot = v >> 9;
            const int c = 32 * j + mm_br5(AP * q + slot / NK) + KL * (slot % NK);
            const bool ok = c < p.nch && t0 + tt < p.n;
            const float *src = xb + (ok ? (int64_t)(t0 + tt) * p.ldx + (int64_t)c * 32 + 4 * piece : 0);
            mm_cp16(&sm.x[buf][slot][tt * MF_LD + 4 * piece], src, ok);
        }
    };

    /* [token b][row a]: the counter works on each value alone */
    float total[TB][4], lvl[5][TB][4], acc[TB][4];
#pragma unroll
    for (int b = 0; b < TB; b++)
#pragma unroll
        for (int a = 0; a < 4; a++) total[b][a] = 0.0f;
    uint4 raw[WU];
    w_load(0, raw);
    x_issue(0, 0);
    mm_commit();
    w_store(0, raw);
    mm_wait<0>();
    __syncthreads();
    for (int j = 0; j < WPR; j++) {
#pragma unroll
        for (int q = 0; q < QS; q++) {
            const int st = j * QS + q, buf = st & 1;
            const bool more = st + 1 < NS;
            if (more) {
                w_load(st + 1, raw);
                x_issue(st + 1, buf ^ 1);
            }
            mm_commit();
#pragma unroll
            for (int i = 0; i < AP; i++) {
                const int m = AP * q + i;
#pragma unroll
                for (int b = 0; b < TB; b++)
#pragma unroll
                    for (int a = 0; a < 4; a++) acc[b][a] = 0.0f;
#pragma unroll
                for (int k = 0; k < NK; k++) {
                    const float *W = sm.w[buf][i * NK + k] + (wr * 32 + rg) * MF_LD;
                    const float *X = sm.x[buf][i * NK + k] + (wt * TPW + tg) * MF_LD;
                    float sum[TB][4];
#pragma unroll
                    for (int b = 0; b < TB; b++)
#pragma unroll
                        for (int a = 0; a < 4; a++) sum[b][a] = 0.0f;
#pragma unroll
                    for (int v4 = 0; v4 < 8; v4++) {
                        float4 wv[4], xv[TB];
#pragma unroll
                        for (int a = 0; a < 4; a++) wv[a] = *(const float4 *)(W + 8 * a * MF_LD + 4 * v4);
#pragma unroll
                        for (int b = 0; b < TB; b++) xv[b] = *(const float4 *)(X + 4 * b * MF_LD + 4 * v4);
#pragma unroll
                        for (int a = 0; a < 4; a++)
#pragma unroll
                            for (int b = 0; b < TB; b++) {
                                sum[b][a] = __fmaf_rn(wv[a].x, xv[b].x, sum[b][a]);
                                sum[b][a] = __fmaf_rn(wv[a].y, xv[b].y, sum[b][a]);
                                sum[b][a] = __fmaf_rn(wv[a].z, xv[b].z, sum[b][a]);
                                sum[b][a] = __fmaf_rn(wv[a].w, xv[b].w, sum[b][a]);
                            }
                    }
#pragma unroll
                    for (int b = 0; b < TB; b++)
#pragma unroll
                        for (int a = 0; a < 4; a++) acc[b][a] = __fadd_rn(acc[b][a], sum[b][a]);
                }
                mm_counter_push(m, j, acc, lvl, total);
            }
            if (more) w_store(buf ^ 1, raw);
            mm_wait<0>();
            __syncthreads();
        }
    }
#pragma unroll
    for (int b = 0; b < TB; b++) {
        const int t = t0 + wt * TPW + tg + 4 * b;
        if (t >= p.n) continue;
#pragma unroll
        for (int a = 0; a < 4; a++) sg.y[(int64_t)t * sg.ldy + r0 + wr * 32 + rg + 8 * a] = total[b][a];
    }
}

template <int WT, int WPR, int NK, int TW> static void launch_mf_tw(cu_ctx *c, const mv_params &p, int rows) {
    /* per device, so on every launch (a batch kernel launch, not a decode step) */
    cudaFuncSetAttribute(k_mm_f<WT, WPR, NK, TW>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sizeof(mf_smem));
    cu_launch(c, k_mm_f<WT, WPR, NK, TW>, dim3(rows / MM_BM, cu_div_up(p.n, MM_BN)), 256 * TW, sizeof(mf_smem), p);
}

template <int WT, int WPR, int NK> static void launch_mf(cu_ctx *c, const mv_params &p, int rows) {
    if (c->mf_tw == 1) launch_mf_tw<WT, WPR, NK, 1>(c, p, rows);
    else launch_mf_tw<WT, WPR, NK, 2>(c, p, rows);
}

/* F16/BF16 batches of at least MM_MIN_N tokens: whole 64-row tiles, rows
 * 16-byte aligned, inputs 16-byte aligned, one chunk per lane position
 * (every F16 weight of Flash; the shapes the tests cover). */
template <int WT, int WPR> static bool try_mf(cu_ctx *c, const mv_params &p, int rows) {
    if (p.n < MM_MIN_N || p.aq) return false;
    for (int i = 0; i < p.n_seg; i++) {
        const cu_seg &g = p.seg[i];
        if (g.rows % MM_BM || g.w.q_row % 16 || (uintptr_t)g.w.q % 16 || g.xoff % 4) return false;
    }
    if ((uintptr_t)p.x % 16 || p.ldx % 4) return false;
    const int nk = (p.nch + 32 * WPR - 1) / (32 * WPR);
    switch (nk) {
    case 1: launch_mf<WT, WPR, 1>(c, p, rows); return true;
    default: return false;
    }
}

template <int WT> static bool mf_wpr(cu_ctx *c, const mv_params &p, int rows, int wpr) {
    switch (wpr) {
    case 1: return try_mf<WT, 1>(c, p, rows);
    case 2: return try_mf<WT, 2>(c, p, rows);
    case 4: return try_mf<WT, 4>(c, p, rows);
    case 8: return try_mf<WT, 8>(c, p, rows);
    default: return false;
    }
}

bool cu_mm_f(cu_ctx *c, const mv_params &p, int rows, int wpr, int type) {
    if (c->no_mma) return false;
    if (type == DS4_TYPE_F16) return mf_wpr<DS4_TYPE_F16>(c, p, rows, wpr);
    if (type == DS4_TYPE_BF16) return mf_wpr<DS4_TYPE_BF16>(c, p, rows, wpr);
    return false;
}

CU_TU_SWITCHES(cu_sw_mm_f)
