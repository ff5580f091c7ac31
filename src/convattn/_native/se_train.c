/* convattn's native CPU kernels for the training tail of SE-style channel attention (an
   average-pooled channel gate: SE, ECA, cSE) after a batch-statistics BatchNorm:

     x = BN(c) = c * s + b,   g = gate(excite(mean_p x)),   y = relu(x * g + identity)

   The batch statistics and the pooled descriptor come from cbam_row_stats (cbam_train.c) in
   one pass over c; the excitation stays in PyTorch. Forward writes y in one more pass;
   backward makes two: the ReLU mask m (identity's gradient) with the per-image, per-channel
   sums that give both the gate's gradient and BatchNorm's reductions, then BatchNorm's
   input gradient. float32, contiguous (N, C, P) maps; threads from PyTorch's OpenMP pool. */

#include <omp.h>

void se_apply(const float *c, const float *s, const float *b, const float *g,
              const float *identity, long N, long C, long P, float *y, int nthreads) {
    long rows = N * C;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (long r = 0; r < rows; r++) {
        const float *restrict v = c + r * P, *restrict id = identity + r * P;
        float *restrict out = y + r * P;
        long ch = r % C;
        float sc = s[ch], sh = b[ch], w = g[r];
#pragma omp simd
        for (long p = 0; p < P; p++) {
            float t = (v[p] * sc + sh) * w + id[p];
            out[p] = t > 0.0f ? t : 0.0f;
        }
    }
}

/* m = g_y where y > 0; per row (image, channel): sum m, sum m * (c - mean), sum (c - mean) */
void se_backward_mask(const float *gy, const float *y, const float *c, const double *mean,
                      long N, long C, long P, float *m, double *sums, int nthreads) {
    long rows = N * C;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (long r = 0; r < rows; r++) {
        const float *restrict v = c + r * P, *restrict g = gy + r * P, *restrict out = y + r * P;
        float *restrict mask = m + r * P;
        float mu = (float)mean[r % C], sm = 0.0f, smc = 0.0f, sc = 0.0f;
#pragma omp simd
        for (long p = 0; p < P; p++) mask[p] = out[p] > 0.0f ? g[p] : 0.0f;
        /* the sums from the row just written (still in cache; one loop with the select and
           the sums does not vectorize), in float over the lanes of a vector (a row's
           elements), then in double over the batch */
#pragma omp simd reduction(+ : sm, smc, sc)
        for (long p = 0; p < P; p++) {
            float mp = mask[p], centred = v[p] - mu;
            sm += mp;
            smc += mp * centred;
            sc += centred;
        }
        sums[3 * r] = sm;
        sums[3 * r + 1] = smc;
        sums[3 * r + 2] = sc;
    }
}

/* g_c = s * (m * g + g_pool) + alpha * (c - mean) + beta, with g_pool the average pool's
   share (its gradient over P) per image and channel */
void se_backward_input(const float *m, const float *c, const float *s, const float *g,
                       const float *g_pool, const float *alpha, const float *beta,
                       const double *mean, long N, long C, long P, float *g_c, int nthreads) {
    long rows = N * C;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (long r = 0; r < rows; r++) {
        const float *restrict v = c + r * P, *restrict mask = m + r * P;
        float *restrict out = g_c + r * P;
        long ch = r % C;
        float sc = s[ch], w = g[r], share = g_pool[r], al = alpha[ch], be = beta[ch];
        float mu = (float)mean[ch];
#pragma omp simd
        for (long p = 0; p < P; p++) out[p] = sc * (mask[p] * w + share) + al * (v[p] - mu) + be;
    }
}
