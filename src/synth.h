/* synth.h - seeded synthetic weights (PERFORMANCE.md §E.2), stated once for
 * C and CUDA: a counter-based generator, so a block's bytes are a pure
 * function of (seed, tensor id, block index) and every backend fills the
 * same model without any file or host traffic.
 *
 * Blocks are valid blocks of their type with a chosen standard deviation
 * (`std`) of the values they decode to, and mean ~0:
 *   F32/F16/BF16  Gaussian (sum of four uniforms)
 *   Q8_0          uniform codes in [-127, 127], f16 scale
 *   Q2_K          uniform 2-bit codes, 4-bit scales 1..15, min = 1.5 x scale
 *   Q4_K          uniform 4-bit codes, 6-bit scales 1..63, min = 7.5 x scale
 *   IQ2_XXS       uniform grid indices, sign patterns and 4-bit group scales
 * Everything here is pure and thread-safe.
 */
#ifndef DS4_SYNTH_H
#define DS4_SYNTH_H

#include <stdint.h>
#include <string.h>

#include "quant.h"

#ifdef __CUDACC__
#define DS4_SYNTH_FN static __host__ __device__ inline
#else
#define DS4_SYNTH_FN static inline
#endif

DS4_SYNTH_FN uint64_t ds4_synth_mix(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* Random 64 bits number `i` of block `b` of tensor key `key`. */
DS4_SYNTH_FN uint64_t ds4_synth_bits(uint64_t key, uint64_t b, uint32_t i) {
    return ds4_synth_mix(key ^ ds4_synth_mix(b * 64 + i));
}

/* Key of a tensor: the seed mixed with FNV-1a of its name. */
DS4_SYNTH_FN uint64_t ds4_synth_key(uint64_t seed, const char *name) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (const char *p = name ? name : ""; *p; p++) h = (h ^ (uint8_t)*p) * 0x100000001b3ull;
    return ds4_synth_mix(seed ^ h);
}

/* Approximately standard normal from 64 random bits (sum of 4 uniforms). */
DS4_SYNTH_FN float ds4_synth_gauss(uint64_t r) {
    float s = 0.0f;
    for (int k = 0; k < 4; k++) s += (float)((r >> (16 * k)) & 0xffff) * (1.0f / 65536.0f);
    return (s - 2.0f) * 1.7320508f; /* var of the sum is 4/12 */
}

/* f32 -> IEEE half, round to nearest even (finite inputs of modest range). */
DS4_SYNTH_FN uint16_t ds4_synth_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    int32_t e = (int32_t)((x >> 23) & 0xff) - 127 + 15;
    uint32_t m = x & 0x7fffffu;
    if (e <= 0) {
        if (e < -10) return (uint16_t)sign;
        m |= 0x800000u;
        uint32_t sh = (uint32_t)(14 - e);
        uint32_t h = m >> sh, rem = m & ((1u << sh) - 1), half = 1u << (sh - 1);
        if (rem > half || (rem == half && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    if (e >= 31) return (uint16_t)(sign | 0x7c00u);
    uint32_t h = ((uint32_t)e << 10) | (m >> 13), rem = m & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

DS4_SYNTH_FN uint16_t ds4_synth_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    x += 0x7fffu + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}

/* Values per block and bytes per block of the types synthesised here. */
DS4_SYNTH_FN int ds4_synth_block_elems(int type) {
    return type == DS4_TYPE_Q8_0 ? 32 : (type == DS4_TYPE_Q2_K || type == DS4_TYPE_Q4_K || type == DS4_TYPE_IQ2_XXS) ? 256
                                                                                                                         : 1;
}
DS4_SYNTH_FN int ds4_synth_block_bytes(int type) {
    switch (type) {
    case DS4_TYPE_F32: return 4;
    case DS4_TYPE_F16: case DS4_TYPE_BF16: return 2;
    case DS4_TYPE_Q8_0: return 34;
    case DS4_TYPE_Q2_K: return 84;
    case DS4_TYPE_Q4_K: return 144;
    case DS4_TYPE_IQ2_XXS: return 66;
    default: return 0;
    }
}

/* Writes block b of a tensor (GGUF layout, ds4_synth_block_bytes(type)
 * bytes) into out. */
DS4_SYNTH_FN void ds4_synth_block(int type, uint64_t key, uint64_t b, float std, uint8_t *out) {
    switch (type) {
    case DS4_TYPE_F32: {
        float v = std * ds4_synth_gauss(ds4_synth_bits(key, b, 0));
        memcpy(out, &v, 4);
        break;
    }
    case DS4_TYPE_F16: {
        uint16_t h = ds4_synth_f16(std * ds4_synth_gauss(ds4_synth_bits(key, b, 0)));
        memcpy(out, &h, 2);
        break;
    }
    case DS4_TYPE_BF16: {
        uint16_t h = ds4_synth_bf16(std * ds4_synth_gauss(ds4_synth_bits(key, b, 0)));
        memcpy(out, &h, 2);
        break;
    }
    case DS4_TYPE_Q8_0: { /* uniform codes: std of a code = 73.6 */
        uint16_t d = ds4_synth_f16(std / 73.6f);
        memcpy(out, &d, 2);
        for (int k = 0; k < 4; k++) {
            uint64_t r = ds4_synth_bits(key, b, (uint32_t)k);
            for (int i = 0; i < 8; i++) out[2 + 8 * k + i] = (uint8_t)(int8_t)((int)((r >> (8 * i)) & 0xff) % 255 - 127);
        }
        break;
    }
    case DS4_TYPE_Q2_K: { /* value = d*sc*(q - 1.5): rms(sc) 9.09, std(q) 1.118 */
        uint64_t r = ds4_synth_bits(key, b, 0);
        for (int j = 0; j < 16; j++) {
            int sc = 1 + (int)((r >> (4 * j)) & 15) % 15;
            out[j] = (uint8_t)(sc | (sc << 4));
        }
        for (int k = 0; k < 8; k++) {
            uint64_t q = ds4_synth_bits(key, b, (uint32_t)(1 + k));
            memcpy(out + 16 + 8 * k, &q, 8);
        }
        float d = std / 10.16f;
        uint16_t hd = ds4_synth_f16(d), hm = ds4_synth_f16(1.5f * d);
        memcpy(out + 80, &hd, 2);
        memcpy(out + 82, &hm, 2);
        break;
    }
    case DS4_TYPE_Q4_K: { /* value = d*sc*(q - 7.5): rms(sc) 36.8, std(q) 4.61 */
        float d = std / 169.7f;
        uint16_t hd = ds4_synth_f16(d), hm = ds4_synth_f16(7.5f * d);
        memcpy(out, &hd, 2);
        memcpy(out + 2, &hm, 2);
        uint64_t r = ds4_synth_bits(key, b, 0);
        int sc[8];
        for (int j = 0; j < 8; j++) sc[j] = 1 + (int)((r >> (8 * j)) & 0xff) % 63;
        uint8_t *s = out + 4;
        for (int j = 0; j < 4; j++) {
            s[j] = (uint8_t)(sc[j] | ((sc[j + 4] >> 4) << 6));
            s[j + 4] = (uint8_t)(sc[j] | ((sc[j + 4] >> 4) << 6)); /* min code = scale code */
            s[j + 8] = (uint8_t)((sc[j + 4] & 15) | ((sc[j + 4] & 15) << 4));
        }
        for (int k = 0; k < 16; k++) {
            uint64_t q = ds4_synth_bits(key, b, (uint32_t)(1 + k));
            memcpy(out + 16 + 8 * k, &q, 8);
        }
        break;
    }
    case DS4_TYPE_IQ2_XXS: { /* |value| ~ d*(0.5+s)/4 * 20 */
        uint16_t hd = ds4_synth_f16(std / 40.0f);
        memcpy(out, &hd, 2);
        for (int g = 0; g < 8; g++) {
            uint64_t r = ds4_synth_bits(key, b, (uint32_t)g);
            uint32_t a0 = (uint32_t)r, a1 = (uint32_t)(r >> 32);
            memcpy(out + 2 + 8 * g, &a0, 4);
            memcpy(out + 6 + 8 * g, &a1, 4);
        }
        break;
    }
    default: break;
    }
}

#endif
