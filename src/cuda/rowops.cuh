/* rowops.cuh - block-wide operations on one row held in shared memory:
 * RMSNorm, RoPE, the official roundings of MODEL.md §E (FP8 E4M3 blocks,
 * Hadamard + FP4 E2M1 blocks, half storage), written to compute exactly
 * what src/numerics.c and cpu_rmsnorm/cpu_rope compute (same expressions;
 * multiplies and adds are kept separate with __fmul_rn/__fadd_rn where the
 * CPU does not fuse them). Reductions are fixed trees (deterministic); the
 * sum of squares runs in double as on the CPU.
 *
 * Every function is called by all threads of the block and ends with a
 * __syncthreads(). red: shared scratch of at least 32 doubles.
 */
#ifndef DS4_CUDA_ROWOPS_CUH
#define DS4_CUDA_ROWOPS_CUH

#include "cuda/quant.cuh"
#include "numerics_inl.h"

/* Block-wide reduction of one value per thread (blockDim a multiple of
 * 32, <= 1024) with a fixed tree (warp shuffles, then warp 0): Op is add or
 * max. red: >= 32 values of T in shared memory. */
struct cu_add {
    template <typename T> __device__ T operator()(T a, T b) const { return a + b; }
};
struct cu_max {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename T, typename Op>
__device__ __forceinline__ T cu_block_reduce(T v, T ident, T *red, Op op) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    if (w == 0) {
        T s = lane < nw ? red[lane] : ident;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s = op(s, __shfl_xor_sync(0xffffffffu, s, o));
        if (lane == 0) red[0] = s;
    }
    __syncthreads();
    T r = red[0];
    __syncthreads();
    return r;
}

__device__ __forceinline__ double cu_block_sumd(double v, double *red) { return cu_block_reduce(v, 0.0, red, cu_add()); }
__device__ __forceinline__ float cu_block_sumf(float v, float *red) { return cu_block_reduce(v, 0.0f, red, cu_add()); }
__device__ __forceinline__ float cu_block_maxf(float v, float *red) { return cu_block_reduce(v, -INFINITY, red, cu_max()); }

/* x[0..n) <- RMSNorm_w(x) (w may be NULL), as cpu_rmsnorm. */
__device__ __forceinline__ void cu_row_rmsnorm(float *x, int n, const float *w, float eps, double *red) {
    double ss = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += (double)x[i] * (double)x[i];
    ss = cu_block_sumd(ss, red);
    float r = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = __fmul_rn(x[i], r);
        x[i] = w ? __fmul_rn(w[i], v) : v;
    }
    __syncthreads();
}

/* Interleaved-pair RoPE of z[0..n_rot) at pos (inverse: angle -theta). */
__device__ __forceinline__ void cu_rope_pair(float *z, int i, const float *inv_freq, int pos, bool inverse) {
    float th = __fmul_rn((float)pos, inv_freq[i]);
    float c = cosf(th), s = sinf(th);
    if (inverse) s = -s;
    float x0 = z[2 * i], x1 = z[2 * i + 1];
    z[2 * i] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
    z[2 * i + 1] = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s));
}

__device__ __forceinline__ void cu_row_rope(float *z, int n_rot, const float *inv_freq, int pos, bool inverse) {
    for (int i = threadIdx.x; i < n_rot / 2; i += blockDim.x) cu_rope_pair(z, i, inv_freq, pos, inverse);
    __syncthreads();
}

/* the scalar rules, shared with numerics.c */
#define cu_ceil_log2 ds4_num_ceil_log2
#define cu_e4m3_round ds4_num_e4m3_round_inl
#define cu_e2m1_round ds4_num_e2m1_round_inl

/* fred[k*block] = max |x| over block k of x[0..n) (the last block may be
 * shorter; block a power of two): a tree of shared-memory maxima, exact. */
__device__ __forceinline__ void cu_row_block_amax(const float *x, int n, int block, float *fred) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) fred[i] = fabsf(x[i]);
    __syncthreads();
    for (int h = block / 2; h > 0; h >>= 1) {
        for (int i = threadIdx.x; i < n; i += blockDim.x)
            if ((i % block) < h && i + h < n && (i / block) == ((i + h) / block)) fred[i] = fmaxf(fred[i], fred[i + h]);
        __syncthreads();
    }
}

/* E.2: one value's FP8 rounding, its block's largest magnitude amax given */
__device__ __forceinline__ float cu_fp8_value(float x, float amax) {
    if (amax < 1e-4f) amax = 1e-4f;
    float scale = ldexpf(1.0f, cu_ceil_log2(amax / 448.0f));
    float v = x / scale;
    if (v > 448.0f) v = 448.0f;
    if (v < -448.0f) v = -448.0f;
    return __fmul_rn(cu_e4m3_round(v), scale);
}

/* E.2: FP8 rounding of x[0..n) in blocks of `block` values, each with its
 * power-of-two scale from the block's amax. fred: >= n floats of scratch. */
__device__ __forceinline__ void cu_row_fp8(float *x, int n, int block, float *fred) {
    cu_row_block_amax(x, n, block, fred);
    for (int i = threadIdx.x; i < n; i += blockDim.x) x[i] = cu_fp8_value(x[i], fred[(i / block) * block]);
    __syncthreads();
}

/* E.3: orthonormal Sylvester Hadamard of x[0..n) (n a power of two),
 * butterfly stages exactly as ds4_num_hadamard. */
__device__ __forceinline__ void cu_row_hadamard(float *x, int n) {
    for (int h = 1; h < n; h *= 2) {
        for (int p = threadIdx.x; p < n / 2; p += blockDim.x) {
            int i = (p / h) * 2 * h + (p % h), j = i + h;
            float a = x[i], b = x[j];
            x[i] = __fadd_rn(a, b);
            x[j] = __fsub_rn(a, b);
        }
        __syncthreads();
    }
    float s = n == 128 ? 0.08838834764831845f : 1.0f / sqrtf((float)n);
    for (int i = threadIdx.x; i < n; i += blockDim.x) x[i] = __fmul_rn(x[i], s);
    __syncthreads();
}

/* E.3: one value's FP4 rounding, its block's largest magnitude amax given */
__device__ __forceinline__ float cu_fp4_value(float x, float amax) {
    const float floor_amax = 6.0f * 0x1p-126f;
    if (amax < floor_amax) amax = floor_amax;
    float scale = ldexpf(1.0f, cu_ceil_log2(amax / 6.0f));
    float v = x / scale;
    if (v > 6.0f) v = 6.0f;
    if (v < -6.0f) v = -6.0f;
    return __fmul_rn(cu_e2m1_round(v), scale);
}

/* E.3: FP4 rounding in blocks of 32 (n a multiple of 32). */
__device__ __forceinline__ void cu_row_fp4(float *x, int n, float *fred) {
    cu_row_block_amax(x, n, 32, fred);
    for (int i = threadIdx.x; i < n; i += blockDim.x) x[i] = cu_fp4_value(x[i], fred[i & ~31]);
    __syncthreads();
}

/* The same two steps (cu_row_hadamard, then cu_row_fp4) on a row held one
 * value per thread: thread i holds value i of n (a power of two, a multiple
 * of 32; whole warps with on == false carry 0s along). The stages below 32
 * by shuffles, 32 and up through b0 / b1 in turn (n floats each, one
 * barrier per stage), the FP4 block amax by shuffles (a block of 32 is one
 * warp): the same expressions, so the same bits. All threads call it. */
__device__ __forceinline__ float cu_reg_hadamard_fp4(float v, int n, bool on, float *b0, float *b1) {
    const int i = threadIdx.x;
#pragma unroll
    for (int h = 1; h < 32; h *= 2) {
        const float o = __shfl_xor_sync(0xffffffffu, v, h);
        v = (i & h) ? __fsub_rn(o, v) : __fadd_rn(v, o);
    }
    for (int h = 32, b = 0; h < n; h *= 2, b ^= 1) {
        float *buf = b ? b1 : b0;
        if (on) buf[i] = v;
        __syncthreads();
        const float o = on ? buf[i ^ h] : 0.0f;
        v = (i & h) ? __fsub_rn(o, v) : __fadd_rn(v, o);
    }
    v = __fmul_rn(v, n == 128 ? 0.08838834764831845f : 1.0f / sqrtf((float)n));
    float am = fabsf(v);
#pragma unroll
    for (int o = 16; o; o >>= 1) am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, o));
    return cu_fp4_value(v, am);
}

__device__ __forceinline__ void cu_row_f16(float *x, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) x[i] = __half2float(__float2half_rn(x[i]));
    __syncthreads();
}

/* Stores a row into cache storage of type T (values already half-exact
 * when T is __half and the f16 cache is on). */
template <typename T> __device__ __forceinline__ T cu_to_row(float v);
template <> __device__ __forceinline__ float cu_to_row<float>(float v) { return v; }
template <> __device__ __forceinline__ __half cu_to_row<__half>(float v) { return __float2half_rn(v); }
__device__ __forceinline__ float cu_from_row(float v) { return v; }
__device__ __forceinline__ float cu_from_row(__half v) { return __half2float(v); }

/* Row `ri` of rows of n values (ld apart) RMSNorm-ed in place by the block,
 * with q != NULL also the Q8_0 codes of the normalised row (n % 32 == 0,
 * scales d) for the next projection: k_rows_rmsnorm's body. row: n floats
 * of shared memory, red: 32 doubles. With reg (DS4_CUDA_ROWNORM_REG)
 * cu_row_rmsnorm's operations on values held in registers, every load
 * issued at once (the weights before the wait for the previous kernel);
 * else through row. */
__device__ __forceinline__ void rows_rmsnorm_body(int ri, float *x, int64_t ld, int n, const float *w, float eps,
                                                  int8_t *q, float *d, int reg, float *row, double *red) {
    float *xr = x + (int64_t)ri * ld;
    constexpr int RK = 16;
    if (reg && n <= RK * (int)blockDim.x) {
        float xv[RK], wv[RK];
#pragma unroll
        for (int k = 0; k < RK; k++) {
            const int i = threadIdx.x + k * blockDim.x;
            wv[k] = w && i < n ? w[i] : 1.0f;
        }
        cu_pdl_wait();
#pragma unroll
        for (int k = 0; k < RK; k++) {
            const int i = threadIdx.x + k * blockDim.x;
            xv[k] = i < n ? xr[i] : 0.0f;
        }
        double ss = 0.0;
#pragma unroll
        for (int k = 0; k < RK; k++)
            if (threadIdx.x + k * blockDim.x < n) ss += (double)xv[k] * (double)xv[k];
        ss = cu_block_sumd(ss, red);
        const float r = 1.0f / sqrtf((float)(ss / n) + eps);
#pragma unroll
        for (int k = 0; k < RK; k++) {
            const int i = threadIdx.x + k * blockDim.x;
            if (i < n) {
                float v = __fmul_rn(xv[k], r);
                v = w ? __fmul_rn(wv[k], v) : v;
                xr[i] = v;
                row[i] = v;
            }
        }
        if (!q) return;
        __syncthreads();
    } else {
        cu_pdl_wait();
        for (int i = threadIdx.x; i < n; i += blockDim.x) row[i] = xr[i];
        __syncthreads();
        cu_row_rmsnorm(row, n, w, eps, red);
        for (int i = threadIdx.x; i < n; i += blockDim.x) xr[i] = row[i];
        if (!q) return;
    }
    const int lane = threadIdx.x & 31, nb = n / 32;
    for (int b = threadIdx.x >> 5; b < nb; b += blockDim.x >> 5)
        cu_warp_q8_0(row[32 * b + lane], q + (int64_t)ri * n + 32 * b, d + (int64_t)ri * nb + b);
}

#endif
