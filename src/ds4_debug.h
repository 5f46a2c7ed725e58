/* ds4_debug.h - debug hooks into the engine for tests and dev tools only
 * (never included by cli/ or server/ code paths that serve users).
 */
#ifndef DS4_DEBUG_H
#define DS4_DEBUG_H

#include <stdbool.h>

#include "ds4.h"

/* The individual switches behind --plain-numerics (MODEL.md §E). */
typedef struct ds4_debug_numerics {
    bool fp8_kv;      /* E.2 FP8 rounding of KV rows */
    bool fp4_indexer; /* E.3 Hadamard + FP4 of indexer queries/keys */
    bool f16_cache;   /* E.4 half storage of cache rows */
    bool act_quant;   /* E.1 int8 activations for quantized weights */
} ds4_debug_numerics;

/* Replaces the engine's numerics; affects sessions created afterwards.
 * Not thread-safe with concurrent session creation. */
void ds4_debug_set_numerics(ds4_engine *e, const ds4_debug_numerics *n);
void ds4_debug_get_numerics(const ds4_engine *e, ds4_debug_numerics *n);

#endif
