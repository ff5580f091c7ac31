/* convattn's native CPU kernel for CBAM's inference tail in a residual block, one call
   instead of some twenty PyTorch operations:

     cw  = gate(mlp(mean_p x) + mlp(max_p x))               channel gate, shared MLP (eq. 2)
     x1  = x * cw
     d   = [max_c x1; mean_c x1]                              spatial descriptor
     sw  = gate(bn(conv_kxk(d)))                              spatial gate (eq. 3), eval BN
     out = relu(x1 * sw + identity)

   x1 is never stored: the spatial pool and the final product recompute it, rounded as the
   eager code rounds it. One OpenMP region of PyTorch's thread pool (see cbam_train.c).
   With bn_a, bn_b (else NULL) the map given is the eval-mode BatchNorm's input y, and
   x = y * bn_a + bn_b is formed in registers wherever it is read (see channel_eval.c).
   float32, contiguous (N, C, H, W) maps; out may be x. */

#include <math.h>
#include <omp.h>

#include "kernels.h"

typedef struct {
    const float *x, *identity;
    const float *bn_a, *bn_b; /* (C) each, or NULL */
    long N, C, H, W;
    const float *w1, *b1, *w2, *b2; /* MLP: (R, C), (R) or NULL, (C, R), (C) or NULL */
    long R;
    int gate; /* 0: sigmoid; 1: hardsigmoid */
    const float *kernel; /* (2, KH, KW): [max; mean] input maps, one output */
    long KH, KW, PH, PW;
    float conv_bias, bn_scale, bn_shift;
    float *z, *hidden, *cw, *desc, *sw; /* (2N, C), (N, R), (N, C), (N, 2, HW), (N, HW) */
    float *out;
} cbam_eval_args;

static void cbam_eval_run(const cbam_eval_args *a) {
    long N = a->N, C = a->C, H = a->H, W = a->W, P = H * W, rows = N * C, R = a->R;
    /* channel descriptors: z[n] = mean, z[N + n] = max over positions */
#pragma omp for schedule(static)
    for (long r = 0; r < rows; r++) {
        const float *restrict v = a->x + r * P;
        float xa = a->bn_a ? a->bn_a[r % C] : 1.0f, xb = a->bn_b ? a->bn_b[r % C] : 0.0f;
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
    /* spatial descriptor of x1 = x * cw, a block of positions of one image at a time (at
       least as many blocks as threads) */
    long block = position_block(P, omp_get_num_threads());
    long blocks = (P + block - 1) / block;
#pragma omp for schedule(static)
    for (long item = 0; item < N * blocks; item++) {
        long n = item / blocks, p0 = (item % blocks) * block;
        long len = P - p0 < block ? P - p0 : block;
        float hi[POSITION_BLOCK], sum[POSITION_BLOCK];
        for (long i = 0; i < len; i++) {
            hi[i] = -INFINITY;
            sum[i] = 0.0f;
        }
        for (long c = 0; c < C; c++) {
            const float *restrict v = a->x + (n * C + c) * P + p0;
            float w = a->cw[n * C + c];
            float xa = a->bn_a ? a->bn_a[c] : 1.0f, xb = a->bn_b ? a->bn_b[c] : 0.0f;
#pragma omp simd
            for (long i = 0; i < len; i++) {
                float x1 = (v[i] * xa + xb) * w;
                sum[i] += x1;
                hi[i] = x1 > hi[i] ? x1 : hi[i];
            }
        }
        float *restrict dmax = a->desc + n * 2 * P + p0, *restrict dmean = dmax + P;
        for (long i = 0; i < len; i++) {
            dmax[i] = hi[i];
            dmean[i] = sum[i] / (float)C;
        }
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
        float xa = a->bn_a ? a->bn_a[r % C] : 1.0f, xb = a->bn_b ? a->bn_b[r % C] : 0.0f;
#pragma omp simd
        for (long p = 0; p < P; p++) {
            float t = (v[p] * xa + xb) * w * s[p] + id[p];
            out[p] = t > 0.0f ? t : 0.0f;
        }
    }
}

void cbam_eval_tail(const float *x, const float *identity, const float *bn_a,
                    const float *bn_b, long N, long C, long H, long W,
                    const float *w1, const float *b1, const float *w2, const float *b2, long R,
                    int gate, const float *kernel, long KH, long KW, long PH, long PW,
                    float conv_bias, float bn_scale, float bn_shift, float *work, float *out,
                    int nthreads) {
    /* work: 2NC (z) + 2NR (hidden) + NC (cw) + 2NHW (desc) + NHW (sw) floats */
    long P = H * W;
    cbam_eval_args a = {x, identity, bn_a, bn_b, N, C, H, W, w1, b1, w2, b2, R, gate, kernel, KH, KW,
                        PH, PW, conv_bias, bn_scale, bn_shift, work, work + 2 * N * C,
                        work + 2 * N * C + 2 * N * R, work + 3 * N * C + 2 * N * R,
                        work + 3 * N * C + 2 * N * R + 2 * N * P, out};
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    cbam_eval_run(&a);
}
