/* convattn's native CPU kernel for the inference tail of a GC block (global context, add
   fusion) after an eval-mode BatchNorm, folded as in convattn.fast._gc_folded_tail:

     x      = a * y + b                                     (BatchNorm: per-channel a, b)
     p      = softmax_j(wa . y_j)                           (attention pooling; the mask
                                                              weight folded with a: the
                                                              constant w . b cancels)
     ctx    = a * sum_j p_j y_j + b                         (the context of x)
     t      = W2 relu(LN(W1 ctx + b1)) + b2                 (transform, LayerNorm over C/r)
     out    = relu(a * y + (b + t) + identity)

   One OpenMP region of PyTorch's thread pool (see cbam_train.c); three passes over y where
   the eager tail makes about eight, and no PyTorch operation per step. Every pass reads
   whole channel rows, split between threads by channel as the convolution before wrote
   them: the scores are summed into a partial score map per thread, not per block of
   positions across all channels (half of which another core had written: inside a
   network that took the GC tails of a ResNet-50 about 15 % longer). The layers come as a
   plan (see channel_eval.c); float32, contiguous (N, C, P) maps. Returns 0, or -1 when the
   workspace cannot be allocated. */

#include <math.h>
#include <omp.h>

#include "kernels.h"

/* The layers (convattn.fast._GcPlan mirrors this; every field is 8 bytes). */
typedef struct {
    eval_norm bn;                     /* the block's BatchNorm */
    long C;
    const float *mask;                /* (C): the 1x1 mask convolution's weight */
    const float *w1, *b1;             /* (R, C), (R) or NULL */
    const float *ln_w, *ln_b;         /* (R) or NULL */
    double ln_eps;
    const float *w2, *b2;             /* (C, R), (C) or NULL */
    long R;
} gc_plan;

typedef struct {
    const float *y, *identity;
    long N, C, P;
    const eval_norm *norm;
    const float *mask;
    float *a, *b, *wa;                /* (C) each: BatchNorm scale, shift, folded mask */
    const float *w1, *b1;             /* (R, C), (R) or NULL */
    const float *ln_w, *ln_b;         /* (R) or NULL */
    float ln_eps;
    const float *w2, *b2;             /* (C, R), (C) or NULL */
    long R;
    float *scores, *ctx, *hidden, *t; /* (N, P), (N, C), (N, R), (N, C) */
    float *s_part;                    /* T partial score maps, `stride` floats apart */
    long stride;                      /* NP rounded up to whole cache lines */
    float *out;
} gc_args;

static void gc_run(const gc_args *g) {
    long N = g->N, C = g->C, P = g->P, R = g->R, rows = N * C;
    int threads = omp_get_num_threads();
#pragma omp for schedule(static)
    for (long c = 0; c < C; c++) {
        eval_norm_fold(g->norm, c, g->a + c, g->b + c);
        g->wa[c] = g->mask[c] * g->a[c];
    }
    /* scores of every position: each thread sums its channels' rows (read contiguously)
       into a partial score map of its own */
    float *part = g->s_part + (long)omp_get_thread_num() * g->stride;
    for (long i = 0; i < N * P; i++) part[i] = 0.0f;
#pragma omp for schedule(static)
    for (long r = 0; r < N * C; r++) {
        const float *restrict v = g->y + r * P;
        float *restrict dst = part + (r / C) * P;
        float w = g->wa[r % C];
#pragma omp simd
        for (long p = 0; p < P; p++) dst[p] += w * v[p];
    }
    /* softmax over positions, per image */
#pragma omp for schedule(static)
    for (long n = 0; n < N; n++) {
        float *restrict s = g->scores + n * P;
        for (long p = 0; p < P; p++) { /* the threads' partial scores summed */
            float t = 0.0f;
            for (int k = 0; k < threads; k++) t += g->s_part[(long)k * g->stride + n * P + p];
            s[p] = t;
        }
        float hi = s[0], sum = 0.0f;
#pragma omp simd reduction(max : hi)
        for (long p = 0; p < P; p++) hi = s[p] > hi ? s[p] : hi;
        for (long p = 0; p < P; p++) {
            s[p] = expf(s[p] - hi);
            sum += s[p];
        }
        float inv = 1.0f / sum;
#pragma omp simd
        for (long p = 0; p < P; p++) s[p] *= inv;
    }
    /* context */
#pragma omp for schedule(static)
    for (long r = 0; r < rows; r++) {
        long n = r / C, c = r % C;
        g->ctx[r] = g->a[c] * dot_product(g->y + r * P, g->scores + n * P, P) + g->b[c];
    }
    /* transform: first layer */
#pragma omp for schedule(static)
    for (long j = 0; j < R; j++)
        for (long n = 0; n < N; n++)
            g->hidden[n * R + j] = dot_product(g->w1 + j * C, g->ctx + n * C, C) + (g->b1 ? g->b1[j] : 0.0f);
    /* LayerNorm over the R channels, then ReLU */
#pragma omp for schedule(static)
    for (long n = 0; n < N; n++) {
        float *h = g->hidden + n * R;
        double mean = 0.0, var = 0.0;
        for (long j = 0; j < R; j++) mean += h[j];
        mean /= (double)R;
        for (long j = 0; j < R; j++) var += ((double)h[j] - mean) * ((double)h[j] - mean);
        var /= (double)R;
        float inv = (float)(1.0 / sqrt(var + (double)g->ln_eps)), mu = (float)mean;
        for (long j = 0; j < R; j++) {
            float v = (h[j] - mu) * inv;
            if (g->ln_w) v = v * g->ln_w[j];
            if (g->ln_b) v = v + g->ln_b[j];
            h[j] = v > 0.0f ? v : 0.0f;
        }
    }
    /* second layer: the term added to every position */
#pragma omp for schedule(static)
    for (long c = 0; c < C; c++)
        for (long n = 0; n < N; n++)
            g->t[n * C + c] = dot_product(g->w2 + c * R, g->hidden + n * R, R) + (g->b2 ? g->b2[c] : 0.0f);
    /* out = relu(a * y + (b + t) + identity) */
#pragma omp for schedule(static)
    for (long r = 0; r < rows; r++) {
        long c = r % C;
        const float *v = g->y + r * P, *restrict id = g->identity + r * P;
        float *o = g->out + r * P; /* may be v: each element is read, then written */
        float scale = g->a[c], shift = g->b[c] + g->t[r];
#pragma omp simd
        for (long p = 0; p < P; p++) {
            float t = v[p] * scale + shift + id[p];
            o[p] = t > 0.0f ? t : 0.0f;
        }
    }
}

int gc_eval_tail(const gc_plan *plan, const float *y, const float *identity, long N, long P,
                 float *out, int nthreads) {
    long C = plan->C, R = plan->R;
    if (nthreads < 1) nthreads = 1;
    long chunk = images_per_chunk(N, C, P);
    /* workspace (for a chunk of k images): 3C (BatchNorm, folded mask) + kP (scores) + 2kC
       (ctx, t) + kR (hidden), then from a cache-line boundary T partial score maps */
    long stride = (chunk * P + 15) / 16 * 16;
    long head = (3 * C + chunk * P + 2 * chunk * C + chunk * R + 15) / 16 * 16;
    float *work = workspace(head + nthreads * stride);
    if (!work) return -1;
    for (long n0 = 0; n0 < N; n0 += chunk) {
        long k = N - n0 < chunk ? N - n0 : chunk, skip = n0 * C * P;
        float *scores = work + 3 * C;
        gc_args g = {y + skip, identity + skip, k, C, P, &plan->bn, plan->mask, work,
                     work + C, work + 2 * C, plan->w1, plan->b1, plan->ln_w, plan->ln_b,
                     (float)plan->ln_eps, plan->w2, plan->b2, R, scores, scores + k * P,
                     scores + k * P + k * C, scores + k * P + k * C + k * R, work + head,
                     stride, out + skip};
#pragma omp parallel num_threads(nthreads)
        gc_run(&g);
    }
    free(work);
    return 0;
}
