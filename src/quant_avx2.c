/* quant_avx2.c - AVX2/FMA kernels (filled in by the next commit). */
#include "quant_impl.h"

const ds4_quant_kernels ds4_quant_avx2_table[1] = {{-1, -1, NULL, NULL, NULL, NULL}};
const int ds4_quant_avx2_n = 0;
