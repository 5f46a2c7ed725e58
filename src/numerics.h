/* numerics.h - the official rounding simulations of docs/MODEL.md §E, stated once.
 *
 * These are model semantics of the release path (not activation
 * quantisation): FP8-E4M3 rounding of stored KV rows (E.2), the Hadamard
 * transform + FP4-E2M1 rounding of indexer queries and keys (E.3), and the
 * storage rounding of cache rows to IEEE half (E.4). Every function works in
 * place on float32 data, is pure, deterministic and thread-safe, and
 * allocates nothing. The CPU backend calls them; the CUDA backend and tests
 * use them as the reference.
 */
#ifndef DS4_NUMERICS_H
#define DS4_NUMERICS_H

#include <stdint.h>

/* E.2: rounds x[0..n) to FP8-E4M3FN in blocks of `block` values (the last
 * block may be shorter), each block with its own power-of-two scale
 * 2^ceil(log2(max(amax, 1e-4) / 448)). */
void ds4_num_fp8_round(float *x, int n, int block);

/* One value v (already divided by the scale, |v| <= 448) rounded to the
 * nearest E4M3FN value, ties to even mantissa. */
float ds4_num_e4m3_round(float v);

/* E.3 step 1: in-place Sylvester-order Hadamard transform of x[0..n),
 * n a power of two, scaled by 1/sqrt(n) (orthonormal). */
void ds4_num_hadamard(float *x, int n);

/* E.3 step 2: rounds x[0..n) to FP4-E2M1 in blocks of 32 with power-of-two
 * scales 2^ceil(log2(max(amax, 6*2^-126) / 6)). n must be a multiple of 32. */
void ds4_num_fp4_round(float *x, int n);

/* One value v (|v| <= 6) rounded to the nearest of {0,.5,1,1.5,2,3,4,6}
 * (with sign), ties to the even code. */
float ds4_num_e2m1_round(float v);

/* E.4: rounds x[0..n) to IEEE half (nearest even; overflow to inf) and back. */
void ds4_num_f16_round(float *x, int n);

/* E.3, exact scores of FP4-rounded vectors (numerics_inl.h explains the
 * codes): x[0..n) (n a multiple of 32) as int8 codes c[0..n) and one power
 * of two p[b] per block of 32, x_i = c_i * p[i / 32] for values on the FP4
 * grid. */
void ds4_num_fp4_codes(const float *x, int n, int8_t *c, float *p);

/* The dot product of two coded vectors of n values (n / 32 blocks), defined
 * exactly: S_b = the integer sum of a_i * b_i over block b, then
 * d = (float)S_0 * (pa[0] * pb[0]) and d = fmaf((float)S_b, pa[b] * pb[b], d)
 * for b = 1, 2, ... in order (every product of powers of two, and of S_b,
 * is exact unless it underflows; the sums round once each). It equals the
 * mathematical dot product of the FP4 values whenever the sums over the
 * first 1, 2, ... blocks fit a float (block scales within ~8 binades of each
 * other, as in Hadamard-spread indexer vectors), so it is then what any
 * exact f32 summation of them gives. */
float ds4_num_fp4_dot(const int8_t *a, const float *pa, const int8_t *b, const float *pb, int n);

#endif
