/* Helpers shared by convattn's native kernels (included by the .c files of this folder). */

#ifndef CONVATTN_KERNELS_H
#define CONVATTN_KERNELS_H

#include <math.h>
#include <stdlib.h>

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

/* An eval-mode BatchNorm read from its own tensors at every call (so in-place updates are
   seen without a cache to refresh): bn(y) = y * a + b per channel, a = weight / sqrt(var +
   eps), b = bias - mean * a (as PyTorch folds it in float); weight, bias NULL: 1, 0; mean NULL:
   no BatchNorm (a = 1, b = 0). Every field is 8 bytes, for ctypes' mirror of the plans. */
typedef struct {
    const float *weight, *bias, *mean, *var;
    double eps;
} eval_norm;

static inline void eval_norm_fold(const eval_norm *bn, long c, float *a, float *b) {
    if (!bn->mean) {
        *a = 1.0f;
        *b = 0.0f;
        return;
    }
    float scale = 1.0f / sqrtf(bn->var[c] + (float)bn->eps);
    if (bn->weight) scale *= bn->weight[c];
    *a = scale;
    *b = (bn->bias ? bn->bias[c] : 0.0f) - bn->mean[c] * scale;
}

/* Images per call of a tail that reads its map more than once: as many as keep the chunk's
   map within CHUNK_BYTES (and at least one), so that the last pass finds the map still in
   cache instead of streaming a whole batch from memory again (a ResNet-50 stage-1 map is
   3.2 MB an image, 26 MB at batch 8). The weights are read once per chunk instead. */
#define CHUNK_BYTES (4L << 20)

static inline long images_per_chunk(long N, long C, long P) {
    long image = C * P * (long)sizeof(float);
    long k = image > 0 ? CHUNK_BYTES / image : N;
    return k < 1 ? 1 : (k > N ? N : k);
}

/* A float workspace of n elements, 64-byte aligned; NULL when memory runs out. */
static inline float *workspace(long n) {
    size_t bytes = ((size_t)(n > 0 ? n : 1) * sizeof(float) + 63) & ~(size_t)63;
    return (float *)aligned_alloc(64, bytes);
}

#endif
