/* dev/att_bench.cu - the CUDA-core attention kernels (k_attn_part + k_attn_merge,
 * src/cuda/ops_attn.cu) alone at Flash's shapes (64 heads x 512, RoPE 64,
 * window 128, f16 rows as in release numerics): each variant's output
 * checked bit for bit against the first (heads per block, splits per block,
 * the head size as a constant or not, sliced merge), and its time; the
 * online merge (DS4_CUDA_ATT_ONLINE) and k_attn_fused checked bit for bit
 * against the online merge's first variant, its distance from the default
 * printed. Cases:
 * a prefill chunk of an HCA and a CSA layer at 2k and 64k, and one decode
 * token of an HCA layer at 1M (8,192 compressed rows). Nothing else of the
 * engine runs, so it fits any GPU (an H100 when no H200 is lent).
 *
 *   sed -n "/^struct attn_p {/,/^int cu_attn_splits/p" src/cuda/ops_attn.cu | sed '$d' > /tmp/k_att.inc
 *   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -I/tmp -Isrc dev/att_bench.cu -o /tmp/att_bench
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>

#include "cuda/cuda.cuh"
#include "cuda/mma.cuh"
#include "cuda/rowops.cuh"

/* the definitions cuda.cuh declares but this tool does not link */
void cu_fail(cu_ctx *, int, const char *, ...) {}

#include "k_att.inc"

#include "dev_cuda.cuh"

static uint64_t rs = 0x9e3779b97f4a7c15ull;
static float rnd() { /* uniform in [-1, 1) */
    rs ^= rs << 13, rs ^= rs >> 7, rs ^= rs << 17;
    return (float)((rs >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}

template <typename T> static T *dev_copy(const std::vector<T> &h) {
    T *d;
    CK(cudaMalloc(&d, h.size() * sizeof(T) + 16));
    CK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}

struct variant {
    const char *name;
    int hb, zb, dhc, mz;
    int tc; /* k_attn_tc with hb heads per block (TF32 tensor cores: other bits, compared by max |diff|) */
    int rh; /* k_attn_part's staged rows as half (DS4_CUDA_ATT_RH) */
    int on; /* DS4_CUDA_ATT_ONLINE: 1 the partial kernel + k_attn_merge<ON>, 2 k_attn_fused (hb heads, rh rows);
             * both checked bit for bit against the first variant with on = 1 */
    int bf; /* DS4_CUDA_ATT_BFLY: the score sums by recursive halving (same bits) */
};

/* registers per thread and resident blocks per SM of a kernel at 256 threads and smem bytes */
template <class K> static void occ(K k, size_t smem, int *regs, int *per_sm) {
    cudaFuncAttributes fa;
    CK(cudaFuncGetAttributes(&fa, k));
    *regs = fa.numRegs;
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, k, 256, smem));
}

/* One launch of the partial kernel for the variant (the host choices of
 * launch_attention, without its heuristics) */
static int g_regs, g_occ; /* the last variant's partial kernel: registers, blocks per SM */

template <int HB, int DHC, bool MZ, bool RH = false> static void part(const attn_p &p, dim3 grid, size_t smem) {
    CK(cudaFuncSetAttribute(k_attn_part<__half, HB, DHC, MZ, RH>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    occ(k_attn_part<__half, HB, DHC, MZ, RH>, smem, &g_regs, &g_occ);
    k_attn_part<__half, HB, DHC, MZ, RH><<<grid, 256, smem>>>(p);
}

template <int HB> static void part_tc(const attn_p &p, dim3 grid, size_t smem) {
    CK(cudaFuncSetAttribute(k_attn_tc<__half, HB>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    occ(k_attn_tc<__half, HB>, smem, &g_regs, &g_occ);
    k_attn_tc<__half, HB><<<grid, 256, smem>>>(p);
}

template <int HB> static void fused(const attn_p &p, int n, size_t smem) {
    CK(cudaFuncSetAttribute(k_attn_fused<__half, HB, 512, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    occ(k_attn_fused<__half, HB, 512, true>, smem, &g_regs, &g_occ);
    k_attn_fused<__half, HB, 512, true><<<dim3(p.H / HB, n), 256, smem>>>(p);
}

/* merge: false times the partial kernel alone */
static void run_variant(attn_p p, int n, const variant &v, bool merge = true) {
    const int S = p.S;
    p.att_bfly = v.bf;
    if (v.on == 2) { /* the whole attention in one kernel */
        const size_t fsm = attn_part_smem(v.hb, p.dh, true) + 4 * (size_t)v.hb * sizeof(float);
        if (v.hb == 16) fused<16>(p, n, fsm);
        else if (v.hb == 8) fused<8>(p, n, fsm);
        else fused<4>(p, n, fsm);
        return;
    }
    p.zb = v.zb;
    const dim3 grid(p.H / v.hb, n, (S + v.zb - 1) / v.zb);
    const size_t smem = attn_part_smem(v.hb, p.dh, v.rh);
    const bool mz = v.zb > 1;
    if (v.rh) {
        if (v.hb == 16) part<16, 512, false, true>(p, grid, smem);
        else if (v.hb == 8) part<8, 512, false, true>(p, grid, smem);
        else part<4, 512, false, true>(p, grid, smem);
    } else if (v.tc) {
        const size_t tsm = attn_tc_smem(v.hb, p.dh, sizeof(__half));
        const dim3 tg((p.H + v.hb - 1) / v.hb, n, S);
        if (v.hb == 64) part_tc<64>(p, tg, tsm);
        else if (v.hb == 32) part_tc<32>(p, tg, tsm);
        else part_tc<16>(p, tg, tsm);
    } else if (v.hb == 16) {
        if (v.dhc) { if (mz) part<16, 512, true>(p, grid, smem); else part<16, 512, false>(p, grid, smem); }
        else { if (mz) part<16, 0, true>(p, grid, smem); else part<16, 0, false>(p, grid, smem); }
    } else if (v.hb == 8) {
        if (v.dhc) part<8, 512, false>(p, grid, smem); else part<8, 0, false>(p, grid, smem);
    } else {
        if (v.dhc) part<4, 512, false>(p, grid, smem); else part<4, 0, false>(p, grid, smem);
    }
    if (!merge) return;
    const size_t msm = ((size_t)p.dh + (v.on ? 4 : v.mz > 1 ? 2 : 1) * (size_t)S) * 4;
    if (v.on) {
        if (v.mz > 1) {
            CK(cudaFuncSetAttribute(k_attn_merge<true, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)msm));
            k_attn_merge<true, true><<<dim3(p.H, n, v.mz), 128, msm>>>(p);
        } else {
            CK(cudaFuncSetAttribute(k_attn_merge<false, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)msm));
            k_attn_merge<false, true><<<dim3(p.H, n), 256, msm>>>(p);
        }
    } else if (v.mz > 1) {
        CK(cudaFuncSetAttribute(k_attn_merge<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)msm));
        k_attn_merge<true><<<dim3(p.H, n, v.mz), 128, msm>>>(p);
    } else {
        CK(cudaFuncSetAttribute(k_attn_merge<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)msm));
        k_attn_merge<false><<<dim3(p.H, n), 256, msm>>>(p);
    }
}

/* n tokens at positions pos0..pos0+n-1 of a layer of kind (ratio 128 HCA,
 * 4 CSA with a random selection of up to topk rows); returns nonzero when a
 * variant's output differs from the first's */
static int bench_case(const char *label, int kind, int pos0, int n, int reps) {
    /* ATT_ONLY=text: only the cases whose label contains it; ATT_VAR=name: only that variant (for ncu) */
    const char *only = getenv("ATT_ONLY"), *vname = getenv("ATT_VAR");
    if (only && *only && !strstr(label, only)) return 0;
    const int H = 64, dh = 512, W = 128, n_rot = 64, topk = 512, ratio = kind == DS4_ATTN_HCA ? 128 : 4;
    const int n_comp_max = kind == DS4_ATTN_HCA ? (pos0 + n) / ratio : kind == DS4_ATTN_CSA ? topk : 0;
    const int comp_cap = kind == DS4_ATTN_HCA ? (pos0 + n) / ratio + 1 : (pos0 + n) / 4 + 1;
    const int S = (W + n_comp_max + ATT_R - 1) / ATT_R;
    /* f16-representable rows (release numerics round them so) */
    std::vector<float> q((size_t)n * H * dh), kv((size_t)n * dh);
    for (auto &x : q) x = rnd() * 0.5f;
    for (auto &x : kv) x = __half2float(__float2half(rnd()));
    std::vector<__half> raw((size_t)W * dh), comp((size_t)comp_cap * dh);
    for (auto &x : raw) x = __float2half(rnd());
    for (auto &x : comp) x = __float2half(rnd());
    std::vector<float> sinks(H), inv(n_rot / 2);
    for (auto &x : sinks) x = rnd();
    for (int i = 0; i < n_rot / 2; i++) inv[i] = powf(10000.0f, -2.0f * i / n_rot);
    std::vector<int32_t> sel((size_t)n * topk), nsel(n);
    for (int t = 0; t < n; t++) {
        const int nc = (pos0 + t + 1) / 4, k = nc < topk ? nc : topk;
        nsel[t] = k;
        for (int i = 0; i < k; i++) sel[(size_t)t * topk + i] = (int)(((uint64_t)i * nc) / k); /* ascending, distinct */
    }
    ds4_step st;
    memset(&st, 0, sizeof st);
    st.pos0 = pos0;
    attn_p p{};
    p.q = dev_copy(q);
    p.kv = dev_copy(kv);
    p.raw = dev_copy(raw);
    p.comp = dev_copy(comp);
    p.sel = kind == DS4_ATTN_CSA ? dev_copy(sel) : nullptr;
    p.n_sel = kind == DS4_ATTN_CSA ? dev_copy(nsel) : nullptr;
    p.sinks = dev_copy(sinks);
    p.inv_freq = dev_copy(inv);
    std::vector<ds4_step> hs(1, st);
    p.step = dev_copy(hs);
    float *o, *po, *pm, *pl;
    CK(cudaMalloc(&o, (size_t)n * H * dh * 4));
    CK(cudaMalloc(&po, (size_t)n * S * H * dh * 4));
    CK(cudaMalloc(&pm, (size_t)n * S * H * 4));
    CK(cudaMalloc(&pl, (size_t)n * S * H * 4));
    p.o = o, p.part_o = po, p.part_m = pm, p.part_l = pl;
    p.t0 = 0, p.S = S, p.H = H, p.dh = dh, p.W = W, p.n_rot = n_rot, p.kind = kind, p.ratio = ratio, p.topk = topk;
    p.scale = 1.0f / sqrtf((float)dh);
    p.att_r4 = 1;
    const variant vs[] = {{"hb4", 4, 1, 0, 1},       {"hb4 dh512", 4, 1, 512, 1},  {"hb16 dh512", 16, 1, 512, 1},
                          {"hb16 mz4", 16, 1, 512, 4}, {"hb16 zb2", 16, 2, 512, 4}, {"hb16 zb4", 16, 4, 512, 4},
                          {"hb16 zb4 rt", 16, 4, 0, 4}, {"hb8 dh512", 8, 1, 512, 4}, {"hb4 rh", 4, 1, 512, 4, 0, 1},
                          {"hb8 rh", 8, 1, 512, 4, 0, 1}, {"hb16 rh", 16, 1, 512, 4, 0, 1}, {"tc16", 16, 1, 0, 4, 1},
                          {"tc64", 64, 1, 0, 4, 1},
                          {"on hb4 rh", 4, 1, 512, 4, 0, 1, 1}, {"on hb8 rh mz1", 8, 1, 512, 1, 0, 1, 1},
                          {"fused4", 4, 1, 512, 1, 0, 1, 2}, {"fused8", 8, 1, 512, 1, 0, 1, 2},
                          {"fused16", 16, 1, 512, 1, 0, 1, 2},
                          {"hb4 rh bf", 4, 1, 512, 4, 0, 1, 0, 1}, {"hb8 rh bf", 8, 1, 512, 4, 0, 1, 0, 1},
                          {"hb16 mz4 bf", 16, 1, 512, 4, 0, 0, 0, 1}, {"fused8 bf", 8, 1, 512, 1, 0, 1, 2, 1},
                          {"fused16 bf", 16, 1, 512, 1, 0, 1, 2, 1}};
    std::vector<float> ref((size_t)n * H * dh), got(ref.size()), ref_on(ref.size());
    printf("%s (n %d at %d, %d splits):", label, n, pos0, S);
    fflush(stdout);
    int bad = 0;
    for (const variant &v : vs) {
        if (vname && *vname && strcmp(vname, v.name) && &v != &vs[0] && strcmp(v.name, "on hb4 rh")) continue;
        CK(cudaMemset(o, 0xff, (size_t)n * H * dh * 4));
        run_variant(p, n, v);
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpy(got.data(), o, got.size() * 4, cudaMemcpyDeviceToHost));
        const bool first = &v == &vs[0], first_on = !strcmp(v.name, "on hb4 rh");
        if (first) ref = got;
        if (first_on) ref_on = got;
        const std::vector<float> &want = v.on ? ref_on : ref;
        const bool same = !memcmp(want.data(), got.data(), got.size() * 4);
        double md = 0; /* largest |difference| to the first variant (tensor-core variants) */
        for (size_t i = 0; i < got.size(); i++) md = fmax(md, fabs((double)got[i] - ref[i]));
        if (first_on) printf(" | (online merge vs default: max |d| %.2e)", md);
        cudaEvent_t e0, e1, e2;
        CK(cudaEventCreate(&e0));
        CK(cudaEventCreate(&e1));
        CK(cudaEventCreate(&e2));
        for (int r = 0; r < 2; r++) run_variant(p, n, v); /* warm */
        CK(cudaEventRecord(e0));
        for (int r = 0; r < reps; r++) run_variant(p, n, v);
        CK(cudaEventRecord(e1));
        for (int r = 0; r < reps; r++) run_variant(p, n, v, false);
        CK(cudaEventRecord(e2));
        CK(cudaEventSynchronize(e2));
        float ms, mp;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        CK(cudaEventElapsedTime(&mp, e1, e2));
        printf(" | %s %.3f ms (part %.3f, %d regs, %d/SM)", v.name, ms / reps, mp / reps, g_regs, g_occ);
        if (v.tc) printf(" maxdiff %.2e", md);
        else if (!same) printf(" DIFFERS");
        bad |= !same && !v.tc;
    }
    printf("\n");
    CK(cudaFree((void *)p.q));
    CK(cudaFree((void *)p.kv));
    CK(cudaFree((void *)p.raw));
    CK(cudaFree((void *)p.comp));
    if (p.sel) CK(cudaFree((void *)p.sel));
    if (p.n_sel) CK(cudaFree((void *)p.n_sel));
    CK(cudaFree((void *)p.sinks));
    CK(cudaFree((void *)p.inv_freq));
    CK(cudaFree((void *)p.step));
    CK(cudaFree(o));
    CK(cudaFree(po));
    CK(cudaFree(pm));
    CK(cudaFree(pl));
    return bad;
}

int main() {
    int bad = 0;
    bad |= bench_case("prefill HCA 2k", DS4_ATTN_HCA, 2048, 256, 5);
    bad |= bench_case("prefill CSA 2k", DS4_ATTN_CSA, 2048, 256, 5);
    bad |= bench_case("prefill HCA 64k", DS4_ATTN_HCA, 65536, 256, 5);
    bad |= bench_case("prefill CSA 64k", DS4_ATTN_CSA, 65536, 256, 5);
    bad |= bench_case("decode HCA 1M", DS4_ATTN_HCA, 1048575, 1, 50);
    bad |= bench_case("decode HCA 64k", DS4_ATTN_HCA, 65535, 1, 50);
    bad |= bench_case("decode CSA 64k", DS4_ATTN_CSA, 65535, 1, 50);
    printf(bad ? "BAD\n" : "OK\n");
    return bad;
}
