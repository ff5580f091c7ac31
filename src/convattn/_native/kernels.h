/* Helpers shared by convattn's native kernels (included by the .c files of this folder). */

#ifndef CONVATTN_KERNELS_H
#define CONVATTN_KERNELS_H

#include <math.h>

/* The gates the kernels know: 0 = sigmoid, 1 = hardsigmoid (relu6(t + 3) / 6). */
static inline float gate_value(float t, int kind) {
    if (kind == 1) {
        float v = t / 6.0f + 0.5f;
        return v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v);
    }
    return 1.0f / (1.0f + expf(-t));
}

/* sum_i a[i] * b[i], vectorised (float lanes, summed at the end). */
static inline float dot_product(const float *restrict a, const float *restrict b, long n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (long i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

/* Work items over the P positions of an image for a reduction across channels: blocks of at
   most POSITION_BLOCK positions (the items' stack arrays), and at least as many blocks as
   threads, so that batch 1 keeps every thread busy. */
#define POSITION_BLOCK 256

static inline long position_block(long P, long threads) {
    long block = (P + threads - 1) / threads;
    return block < POSITION_BLOCK ? block : POSITION_BLOCK;
}

#endif
