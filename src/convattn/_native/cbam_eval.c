/* convattn's native CPU kernel for CBAM's inference tail in a residual block, one call
   instead of some twenty PyTorch operations:

     cw  = gate(mlp(mean_p x) + mlp(max_p x))               channel gate, shared MLP (eq. 2)
     x1  = x * cw
     d   = [max_c x1; mean_c x1]                              spatial descriptor
     sw  = gate(bn(conv_kxk(d)))                              spatial gate (eq. 3), eval BN
     out = relu(x1 * sw + identity)

   x1 is never stored: the spatial pool and the final product recompute it, rounded as the
   eager code rounds it. Every pass reads whole channel rows, split between threads by
   channel as the convolution before wrote them (see gc_eval.c). One OpenMP region of PyTorch's thread pool (see cbam_train.c).
   With a BatchNorm in the plan the map given is the eval-mode BatchNorm's input y, and
   x = y * a + b is formed in registers wherever it is read (see channel_eval.c, also for the
   plan). float32, contiguous (N, C, H, W) maps; out may be x. Returns 0, or -1 when the
   workspace cannot be allocated. */

#include <math.h>
#include <omp.h>

#include "kernels.h"

/* The layers (convattn.fast._CbamPlan mirrors this; every field is 8 bytes). */
typedef struct {
    eval_norm bn;                   /* the block's BatchNorm, folded (bn.mean NULL: none) */
    long C;
    const float *w1, *b1, *w2, *b2; /* MLP: (R, C), (R) or NULL, (C, R), (C) or NULL */
    long R;
    long gate;                      /* 0: sigmoid; 1: hardsigmoid */
    const float *kernel;            /* (2, KH, KW): [max; mean] input maps, one output */
    const float *conv_bias;         /* (1) or NULL */
    long KH, KW, PH, PW;
    eval_norm spatial_bn;           /* the spatial gate's BatchNorm (mean NULL: none) */
} cbam_plan;

typedef struct {
    const float *x, *identity;
    long N, C, H, W;
    const float *w1, *b1, *w2, *b2;
    long R;
    int gate;
    const float *kernel;
    long KH, KW, PH, PW;
    float conv_bias, bn_scale, bn_shift;
    const eval_norm *norm;
    float *bn_a, *bn_b;                 /* (C) each */
    float *z, *hidden, *cw, *desc, *sw; /* (2N, C), (N, R), (N, C), (N, 2, HW), (N, HW) */
    float *part;                        /* T partial descriptors (N, 2, HW), `stride` apart */
    long stride;                        /* 2NHW rounded up to whole cache lines */
    float *out;
} cbam_eval_args;

static void cbam_eval_run(const cbam_eval_args *a) {
    long N = a->N, C = a->C, H = a->H, W = a->W, P = H * W, rows = N * C, R = a->R;
    const float *bn_a = a->bn_a, *bn_b = a->bn_b;
#pragma omp for schedule(static)
    for (long c = 0; c < C; c++) eval_norm_fold(a->norm, c, a->bn_a + c, a->bn_b + c);
    /* channel descriptors: z[n] = mean, z[N + n] = max over positions */
#pragma omp for schedule(static)
    for (long r = 0; r < rows; r++) {
        const float *restrict v = a->x + r * P;
        float xa = bn_a[r % C], xb = bn_b[r % C];
        float sum = 0.0f, hi = -INFINITY;
#pragma omp simd reduction(+ : sum) reduction(max : hi)
        for (long p = 0; p < P; p++) {
            float xv = v[p] * xa + xb;
            sum += xv;
            hi = xv > hi ? xv : hi;
        }
        a->z[r] = sum / (float)P;
        a->z[rows + r] = hi;
    }
    /* shared MLP on both descriptors, summed before the gate: fc2 is linear, so
       fc2(h_avg) + fc2(h_max) = W2 (h_avg + h_max) + 2 b2 (one product per channel) */
#pragma omp for schedule(static)
    for (long j = 0; j < R; j++) {
        const float *restrict wj = a->w1 + j * C;
        float bias = a->b1 ? a->b1[j] : 0.0f;
        for (long n = 0; n < N; n++) {
            const float *restrict za = a->z + n * C, *restrict zm = a->z + rows + n * C;
            float avg = 0.0f, peak = 0.0f;
#pragma omp simd reduction(+ : avg, peak)
            for (long i = 0; i < C; i++) {
                avg += wj[i] * za[i];
                peak += wj[i] * zm[i];
            }
            avg += bias;
            peak += bias;
            a->hidden[n * R + j] = (avg > 0.0f ? avg : 0.0f) + (peak > 0.0f ? peak : 0.0f);
        }
    }
#pragma omp for schedule(static)
    for (long c = 0; c < C; c++)
        for (long n = 0; n < N; n++) {
            float bias = a->b2 ? a->b2[c] : 0.0f;
            float t = dot_product(a->w2 + c * R, a->hidden + n * R, R) + (bias + bias);
            a->cw[n * C + c] = gate_value(t, a->gate);
        }
    /* spatial descriptor of x1 = x * cw: each thread takes whole channel rows (split by
       channel as the convolution before wrote them) into partial max and sum maps of its
       own, merged once all are in */
    int threads = omp_get_num_threads();
    float *part = a->part + (long)omp_get_thread_num() * a->stride;
    for (long n = 0; n < N; n++)
        for (long p = 0; p < P; p++) {
            part[n * 2 * P + p] = -INFINITY;
            part[n * 2 * P + P + p] = 0.0f;
        }
#pragma omp for schedule(static)
    for (long r = 0; r < rows; r++) {
        long n = r / C, c = r % C;
        const float *restrict v = a->x + r * P;
        float *restrict hi = part + n * 2 * P, *restrict sum = hi + P;
        float w = a->cw[r], xa = bn_a[c], xb = bn_b[c];
#pragma omp simd
        for (long p = 0; p < P; p++) {
            float x1 = (v[p] * xa + xb) * w;
            sum[p] += x1;
            hi[p] = x1 > hi[p] ? x1 : hi[p];
        }
    }
#pragma omp for schedule(static)
    for (long i = 0; i < N * P; i++) {
        long n = i / P, p = i % P;
        float hi = -INFINITY, sum = 0.0f;
        for (int t = 0; t < threads; t++) {
            const float *q = a->part + (long)t * a->stride + n * 2 * P;
            hi = q[p] > hi ? q[p] : hi;
            sum += q[P + p];
        }
        a->desc[n * 2 * P + p] = hi;
        a->desc[n * 2 * P + P + p] = sum / (float)C;
    }
    /* k x k convolution of the descriptor to one map, eval BatchNorm, gate; one output row
       per work item */
#pragma omp for schedule(static)
    for (long item = 0; item < N * H; item++) {
        long n = item / H, h = item % H;
        const float *d = a->desc + n * 2 * P;
        float *restrict row = a->sw + n * P + h * W;
        for (long w = 0; w < W; w++) row[w] = a->conv_bias;
        for (long m = 0; m < 2; m++)
            for (long i = 0; i < a->KH; i++) {
                long src = h + i - a->PH;
                if (src < 0 || src >= H) continue;
                const float *in = d + m * P + src * W;
                for (long j = 0; j < a->KW; j++) {
                    float k = a->kernel[(m * a->KH + i) * a->KW + j];
                    long lo = a->PW - j > 0 ? a->PW - j : 0;
                    long hi = W + a->PW - j < W ? W + a->PW - j : W;
                    long shift = j - a->PW;
#pragma omp simd
                    for (long w = lo; w < hi; w++) row[w] += k * in[w + shift];
                }
            }
        for (long w = 0; w < W; w++) row[w] = gate_value(row[w] * a->bn_scale + a->bn_shift, a->gate);
    }
    /* out = relu(x1 * sw + identity) */
#pragma omp for schedule(static)
    for (long r = 0; r < rows; r++) {
        const float *v = a->x + r * P, *restrict id = a->identity + r * P;
        const float *restrict s = a->sw + (r / C) * P;
        float *out = a->out + r * P; /* may be v: each element is read, then written */
        float w = a->cw[r];
        float xa = bn_a[r % C], xb = bn_b[r % C];
#pragma omp simd
        for (long p = 0; p < P; p++) {
            float t = (v[p] * xa + xb) * w * s[p] + id[p];
            out[p] = t > 0.0f ? t : 0.0f;
        }
    }
}

int cbam_eval_tail(const cbam_plan *plan, const float *x, const float *identity, long N, long H,
                   long W, float *out, int nthreads) {
    long C = plan->C, R = plan->R, P = H * W;
    long chunk = images_per_chunk(N, C, P);
    if (nthreads < 1) nthreads = 1;
    /* workspace (for a chunk of k images): 2C (BatchNorm) + 2kC (z) + 2kR (hidden) + kC (cw)
       + 2kHW (desc) + kHW (sw), then from a cache-line boundary T partial descriptors */
    long head = (2 * C + 3 * chunk * C + 2 * chunk * R + 3 * chunk * P + 15) / 16 * 16;
    long stride = (2 * chunk * P + 15) / 16 * 16;
    float *work = workspace(head + nthreads * stride);
    if (!work) return -1;
    float bn_scale, bn_shift; /* the spatial gate's one-channel BatchNorm */
    eval_norm_fold(&plan->spatial_bn, 0, &bn_scale, &bn_shift);
    for (long n0 = 0; n0 < N; n0 += chunk) {
        long k = N - n0 < chunk ? N - n0 : chunk, skip = n0 * C * P;
        float *z = work + 2 * C;
        cbam_eval_args a = {x + skip, identity + skip, k, C, H, W, plan->w1, plan->b1,
                            plan->w2, plan->b2, R, (int)plan->gate, plan->kernel, plan->KH,
                            plan->KW, plan->PH, plan->PW,
                            plan->conv_bias ? plan->conv_bias[0] : 0.0f, bn_scale, bn_shift,
                            &plan->bn, work, work + C, z, z + 2 * k * C, z + 2 * k * C + 2 * k * R,
                            z + 3 * k * C + 2 * k * R, z + 3 * k * C + 2 * k * R + 2 * k * P,
                            work + head, stride, out + skip};
#pragma omp parallel num_threads(nthreads)
        cbam_eval_run(&a);
    }
    free(work);
    return 0;
}
