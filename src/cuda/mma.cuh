/* mma.cuh - the pieces of the tensor-core batch kernels (matvec.cu,
 * ops_moe.cu): cp.async staging, the int8 mma m16n8k32 and the shared
 * memory layout of 32-byte chunk rows. */
#ifndef DS4_CUDA_MMA_CUH
#define DS4_CUDA_MMA_CUH

#include <stdint.h>

#include "cuda/cuda.cuh"

/* batches of at least this many tokens take the tensor-core kernels */
#define MM_MIN_N 32
/* block tile of the batch kernels: rows x tokens */
#define MM_BM 64
#define MM_BN 64

/* 16 bytes global -> shared, asynchronously; zeros when !ok (src unread) */
__device__ __forceinline__ void mm_cp16(void *dst, const void *src, bool ok) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void mm_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void mm_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void mm_mma(const unsigned (&a)[4], unsigned b0, unsigned b1, int (&c)[4]) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%10,%10,%10};\n"
                 : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(0));
}

/* ldmatrix .x4: four 8 x 16-byte matrices from shared memory, lane l giving
 * the address of row (l & 7) of matrix (l >> 3); register i of lane l is
 * word (l & 3) of row (l >> 2) of matrix i -- the int8 m16n8k32 fragment
 * words, loaded by one instruction instead of four (the same bytes) */
__device__ __forceinline__ void mm_ldsm4(unsigned (&r)[4], const void *row) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

/* an mma's int32 dot as a float: the conversion instruction I2F. Forming
 * it from the bits 0x4B400000 + x minus 1.5 * 2^23 instead (an integer add
 * and an exact float subtraction, no conversion unit) was measured slower:
 * H100 2026-12-06, q2:20, 2,048-token prefill chunk, 4,411-4,421 -> 4,196-4,209
 * tok/s (dev/cuda_notes.md, twenty-fourth session) */
__device__ __forceinline__ float mm_i2f(int x) { return (float)x; }

/* byte offset of 32-bit word w (0..7) of row r of a 32-byte-per-row slot:
 * the two 16-byte halves swap on rows 4..7 mod 8 (conflict-free fragments) */
__device__ __forceinline__ int mm_off(int r, int w) { return r * 32 + ((((w >> 2) ^ (r >> 2)) & 1) << 4) + (w & 3) * 4; }

__host__ __device__ constexpr int mm_br5(int m) {
    return ((m & 1) << 4) | ((m & 2) << 2) | (m & 4) | ((m & 8) >> 2) | ((m & 16) >> 4);
}

/* Arrival m (lane mm_br5(m)) of a warp's sum in cu_warp_sum's pairing, as a
 * binary counter: level b of lvl keeps a pending sum; at m = 31 a holds the
 * warp sum (of each of the N values). */
__device__ __forceinline__ float cu_add_rn(float x, float y) { return __fadd_rn(x, y); }
__device__ __forceinline__ double cu_add_rn(double x, double y) { return __dadd_rn(x, y); }
template <int N, typename T>
__device__ __forceinline__ void cu_bfly_push(int m, T (&a)[N], T (&lvl)[5][N]) {
    bool placed = false;
#pragma unroll
    for (int b = 0; b < 5; b++) {
        if (placed) continue;
        if ((m >> b) & 1) {
#pragma unroll
            for (int i = 0; i < N; i++) a[i] = cu_add_rn(lvl[b][i], a[i]); /* never contracted */
        } else {
#pragma unroll
            for (int i = 0; i < N; i++) lvl[b][i] = a[i];
            placed = true;
        }
    }
}

/* The counter for an NA x 4 thread tile: acc holds the sums of arrival m of
 * stripe j; at m = 31 the warp sum is added to total in stripe (warp) order. */
template <int NA>
__device__ __forceinline__ void mm_counter_push(int m, int j, float (&acc)[NA][4], float (&lvl)[5][NA][4],
                                                float (&total)[NA][4]) {
    cu_bfly_push<4 * NA, float>(m, reinterpret_cast<float(&)[4 * NA]>(acc),
                                reinterpret_cast<float(&)[5][4 * NA]>(lvl));
    if (m == 31) {
#pragma unroll
        for (int a = 0; a < NA; a++)
#pragma unroll
            for (int e = 0; e < 4; e++) total[a][e] = j ? __fadd_rn(total[a][e], acc[a][e]) : acc[a][e];
    }
}

/* the launch of a matvec (matvec.cu): segments of rows of one weight type
 * and row length, each with its own output and input offset */
struct mv_params {
    cu_seg seg[CU_MAX_SEGS];
    int seg_end[CU_MAX_SEGS]; /* cumulative rows */
    int n_seg;
    int n, nch;
    const float *x;
    int64_t ldx;
    const int8_t *aq;
    const float *ad;
    const int32_t *abs;
    int64_t ldq;
    const ds4_step *step;
    int skip_le;
    const uint64_t *grid;
    const uint8_t *ksigns;
    int pf;                   /* > 0: blocks below pf prefetch the weight rows of blocks b, b + pf, ... to L2 */
    cu_comb_job cj;           /* DS4_CUDA_COMB_BIG: an HC-pre comb run by block 0 (k_matvec_q8r; the rows' blocks follow) */
};

/* The L2 prefetch of a matvec block's weights, before its cu_pdl_wait (the
 * weights do not depend on the previous kernel; only with
 * DS4_CUDA_EARLY_TRIGGER=1, when blocks start while the previous kernel
 * runs): block b < p.pf takes the
 * rows of blocks b, b + pf, ... (rpb rows each; pf about the blocks that
 * are resident at once, so the first wave covers the whole weight), one
 * thread per segment. */
__device__ __forceinline__ void mv_prefetch(const mv_params &p, int rpb, int bx = -1, int nbx = -1) {
    if (bx < 0) bx = blockIdx.x, nbx = gridDim.x;
    if (p.pf <= 0 || bx >= p.pf || (int)threadIdx.x >= p.n_seg) return;
    const int s = threadIdx.x, start = s ? p.seg_end[s - 1] : 0, end = p.seg_end[s];
    const cu_w &w = p.seg[s].w;
    for (int b = bx; b < nbx; b += p.pf) {
        const int r0 = b * rpb > start ? b * rpb : start, r1 = (b + 1) * rpb < end ? (b + 1) * rpb : end;
        if (r0 >= r1) continue;
        cu_prefetch_l2(w.q + (size_t)(r0 - start) * w.q_row, (size_t)(r1 - r0) * w.q_row);
        if (w.s) cu_prefetch_l2(w.s + (size_t)(r0 - start) * w.s_row, (size_t)(r1 - r0) * w.s_row);
    }
}

/* Batch kernels; false when the shape or the switches leave the batch to
 * the matvec kernels. Q8_0 x Q8_0 on int8 tensor cores (mm_q8.cu); F16 and
 * BF16 x f32 register-tiled (mm_f.cu). */
bool cu_mm_q8(cu_ctx *c, const mv_params &p, int rows, int wpr);
/* DS4_CUDA_BLAS=1 (mm_blas.cu): the batch as cuBLAS FP16 GEMMs (other bits) */
bool cu_blas_q8(cu_ctx *c, const mv_params &p);
bool cu_mm_f(cu_ctx *c, const mv_params &p, int rows, int wpr, int type);

#endif
