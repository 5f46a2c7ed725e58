/* mm_blas.cu - DS4_CUDA_BLAS=1 (opt-in; other bits than the exact path):
 * the Q8_0 x Q8_0 projections of batches of at least DS4_CUDA_BLAS_MIN
 * tokens (default 128: prefill chunks) as cuBLAS GEMMs on FP16 tensor cores
 * with FP32 accumulation.
 *
 * The exact path (mm_q8.cu) gives every output the decode kernels' float
 * operations, one 32-value chunk at a time, which holds it to ~100 int8
 * TOPS on an H100. Here each launch's activation codes become FP16 values
 * q * d (one rounding of the exact product), each weight segment is
 * expanded to FP16 the same way into a scratch of CU_BLAS_WH values, and
 * cublasGemmEx multiplies them. So the products differ from the exact path
 * by the FP16 rounding of both factors (relative 2^-11 each) and the sums
 * by their order (values below 2^-14 lose more: FP16 subnormals); a
 * token's values may depend on the batch around it. cuBLAS picks the same
 * algorithm for the same shapes on the same GPU, so a run is bit-identical
 * to the next. A value beyond FP16's range (activation or weight) fails the
 * step (CU_ST_F16_RANGE) instead of giving infinities. A launch with a
 * weight segment above CU_BLAS_WH values (e.g. the vocabulary head) keeps
 * the exact kernels.
 *
 * cuBLAS is loaded at run time (libcublas.so.13, or DS4_CUBLAS_LIB) only
 * when the switch is on, so that the default build needs no cuBLAS. */
#include "cuda/cuda.cuh"
#include "cuda/mma.cuh"
#include "cuda/quant.cuh"

#include <cublas_v2.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

static struct {
    pthread_mutex_t mu;
    bool tried;
    void *lib;
    char why[256];
    decltype(&cublasCreate_v2) create;
    decltype(&cublasDestroy_v2) destroy;
    decltype(&cublasSetStream_v2) set_stream;
    decltype(&cublasSetWorkspace_v2) set_workspace;
    cublasStatus_t (*gemm)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void *,
                           const void *, cudaDataType, int, const void *, cudaDataType, int, const void *, void *,
                           cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
    decltype(&cublasGetStatusString) status_string;
} blas = {PTHREAD_MUTEX_INITIALIZER};

static bool blas_load(void) {
    pthread_mutex_lock(&blas.mu);
    if (!blas.tried) {
        blas.tried = true;
        const char *syms[] = {"cublasCreate_v2", "cublasDestroy_v2", "cublasSetStream_v2", "cublasSetWorkspace_v2",
                              "cublasGemmEx", "cublasGetStatusString"};
        void **slots[] = {(void **)&blas.create, (void **)&blas.destroy, (void **)&blas.set_stream,
                          (void **)&blas.set_workspace, (void **)&blas.gemm, (void **)&blas.status_string};
        blas.lib = cu_dl_load("cuBLAS", "DS4_CUBLAS_LIB", "libcublas.so.13", "libcublas.so", syms, slots, 6, blas.why,
                              sizeof blas.why);
    }
    bool ok = blas.lib && !blas.why[0];
    pthread_mutex_unlock(&blas.mu);
    return ok;
}

#define BLAS_WS ((size_t)32 << 20) /* the handle's workspace (bytes) */

bool cu_blas_open(cu_ctx *c) {
    if (!blas_load()) {
        cu_fail(c, DS4_E_BACKEND, "cuda: DS4_CUDA_BLAS=1 needs cuBLAS: %s", blas.why);
        return false;
    }
    cublasHandle_t h = nullptr;
    cublasStatus_t st = blas.create(&h);
    if (st != CUBLAS_STATUS_SUCCESS) {
        cu_fail(c, DS4_E_BACKEND, "cuda: cuBLAS handle: %s", blas.status_string(st));
        return false;
    }
    c->blas_h = h;
    if (!cu_ok(c, cudaMalloc(&c->blas_ws, BLAS_WS), "cuBLAS workspace")) return false;
    c->blas_st = c->st;
    st = blas.set_stream(h, c->st);
    if (st == CUBLAS_STATUS_SUCCESS) st = blas.set_workspace(h, c->blas_ws, BLAS_WS);
    if (st != CUBLAS_STATUS_SUCCESS) {
        cu_fail(c, DS4_E_BACKEND, "cuda: cuBLAS stream/workspace: %s", blas.status_string(st));
        return false;
    }
    fprintf(stderr, "ds4: cuda: DS4_CUDA_BLAS=1: Q8_0 projections of batches of %d+ tokens on cuBLAS FP16 GEMMs\n",
            cu_blas_min(c));
    return true;
}

void cu_blas_close(cu_ctx *c) {
    if (c->blas_h && blas.destroy) blas.destroy((cublasHandle_t)c->blas_h);
    if (c->blas_ws) cudaFree(c->blas_ws);
    c->blas_h = nullptr;
    c->blas_ws = nullptr;
}

/* 8 int8 codes times their scale as FP16 (one rounding of the exact
 * product) at out (16-byte aligned); a value beyond FP16's range (or not a
 * number) sets CU_ST_F16_RANGE */
__device__ __forceinline__ void blas_h8(int2 v, float s, __half *out, int *status) {
    const int8_t *b = (const int8_t *)&v;
    __align__(16) __half h[8];
    bool big = false;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const float f = __fmul_rn((float)b[j], s);
        big |= !(fabsf(f) <= 65504.0f);
        h[j] = __float2half_rn(f);
    }
    *(int4 *)out = *(const int4 *)h;
    if (big) atomicOr(status, CU_ST_F16_RANGE);
}

/* FP16 values of Q8_0 activation codes: xh[t * ncols + k] = q * d for the
 * n rows of ncols values (ldq apart; ld / 32 scales per row). One thread
 * per 8 values. */
__global__ void k_blas_act(const int8_t *q, const float *d, int64_t ldq, int n, int ncols, __half *xh, int *status) {
    cu_pdl_wait();
    const int per = ncols / 8;
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)n * per) return;
    const int t = (int)(i / per), k = (int)(i % per) * 8;
    blas_h8(*(const int2 *)(q + (int64_t)t * ldq + k), d[(int64_t)t * (ldq / 32) + k / 32],
            xh + (int64_t)t * ncols + k, status);
}

/* FP16 values of rows of a Q8_0 weight (codes and f16 scales in their
 * planes, cu_w): wh[r * n_in + k] = q * d. One thread per 8 values. The
 * wait also orders the write after the GEMM that read the last segment. */
__global__ void k_blas_w(cu_w w, int rows, int n_in, __half *wh, int *status) {
    cu_pdl_wait();
    const int per = n_in / 8;
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)rows * per) return;
    const int r = (int)(i / per), k = (int)(i % per) * 8;
    blas_h8(*(const int2 *)(w.q + (size_t)r * w.q_row + k),
            cu_h2f(cu_ld16(w.s + (size_t)r * w.s_row + 2 * (size_t)(k / 32))), wh + (size_t)r * n_in + k, status);
}

bool cu_blas_q8(cu_ctx *c, const mv_params &p) {
    /* the main stream only: the handle is bound to it, and xh / wh are one
     * scratch (a side stream's compressors must not share them); never in a
     * captured step (MTP verify rows: with a low BLAS_MIN, h_proj's n * n_hc) */
    if (!c->blas_h || c->st != c->blas_st || c->capturing || !c->s.xh || !c->s.wh || p.n < cu_blas_min(c) ||
        p.skip_le > 0 || !p.aq || p.ldq % 32 || (size_t)p.n * (size_t)p.ldq > c->s.xh_cap)
        return false;
    const int n_in = p.nch * 32;
    for (int i = 0; i < p.n_seg; i++) {
        const cu_seg &g = p.seg[i];
        if ((size_t)g.rows * n_in > CU_BLAS_WH || g.ldy < g.rows || g.xoff + n_in > p.ldq || g.xoff % 8 ||
            g.w.q_row % 8 || (uintptr_t)g.w.q % 8 || g.w.type != DS4_TYPE_Q8_0)
            return false;
    }
    if ((uintptr_t)p.aq % 8 || p.ldq > INT32_MAX) return false;
    const int ncols = (int)p.ldq;
    cu_launch(c, k_blas_act, cu_div_up((int64_t)p.n * (ncols / 8), 256), 256, 0, p.aq, p.ad, p.ldq, p.n, ncols, c->s.xh,
              c->dstatus);
    CU_LAUNCH(c, "blas_act");
    const float one = 1.0f, zero = 0.0f;
    for (int i = 0; i < p.n_seg && !c->err; i++) {
        const cu_seg &g = p.seg[i];
        cu_launch(c, k_blas_w, cu_div_up((int64_t)g.rows * (n_in / 8), 256), 256, 0, g.w, g.rows, n_in, c->s.wh,
                  c->dstatus);
        CU_LAUNCH(c, "blas_w");
        /* column-major view: y (rows x n, ld ldy) = wh^T (rows x n_in) . xh (n_in x n, ld ncols) */
        const cublasStatus_t st = blas.gemm((cublasHandle_t)c->blas_h, CUBLAS_OP_T, CUBLAS_OP_N, g.rows, p.n, n_in, &one,
                                            c->s.wh, CUDA_R_16F, n_in, c->s.xh + g.xoff, CUDA_R_16F, ncols, &zero, g.y,
                                            CUDA_R_32F, (int)g.ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        if (st != CUBLAS_STATUS_SUCCESS) {
            cu_fail(c, DS4_E_BACKEND, "cuda: cuBLAS GEMM (%d x %d x %d): %s", g.rows, p.n, n_in, blas.status_string(st));
            break;
        }
        CU_LAUNCH(c, "blas_gemm");
    }
    return true;
}

CU_TU_SWITCHES(cu_sw_blas)
