/* quant_ref.c - the reference quantizers of FORMATS.md §C (byte-exact with
 * ggml's reference C quantizers when compiled with -ffp-contract=off).
 *
 * Scalar on purpose: SIMD would change float rounding and hence bytes.
 * Each function quantizes one row of n values (n a whole number of blocks).
 */
#include <math.h>

#include "quant_impl.h"

/* C.1: d = amax/127, q = roundf(x/d) (ties away from zero), with the
 * reciprocal of the unrounded d; d is stored as f16. */
void ds4_quant_ref_q8_0(const float *x, void *dst, int64_t n) {
    for (int64_t b = 0; b < n / DS4_QK8_0; b++) {
        const float *xb = x + b * DS4_QK8_0;
        ds4_block_q8_0 o;
        float amax = 0.0f;
        for (int i = 0; i < DS4_QK8_0; i++) {
            float v = fabsf(xb[i]);
            if (v > amax) amax = v;
        }
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        o.d = ds4_f32_to_f16(d);
        for (int i = 0; i < DS4_QK8_0; i++) o.qs[i] = (int8_t)roundf(xb[i] * id);
        memcpy((uint8_t *)dst + (size_t)b * sizeof o, &o, sizeof o);
    }
}
