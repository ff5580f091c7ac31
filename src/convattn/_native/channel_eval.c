/* convattn's native CPU kernel for the inference tail of channel attention in a residual
   block, one call instead of eight to twelve PyTorch operations:

     z   = mean_p x                                   (squeeze: global average pool)
     g   = gate(fc2(relu(fc1(z))))                    (SE / cSE excitation)
         or gate(conv1d_k(z))                         (ECA: 1-D convolution across channels)
     s   = sigmoid(w . x[:, p] + b)                   (scSE only: sSE's 1x1 convolution)
     out = relu(x * g + identity)                     (SE, ECA)
         or relu(max(x * g, x * s) + identity), or relu(x * g + x * s + identity)   (scSE)

   Inside a network at batch 1 every PyTorch operation costs tens of microseconds of
   dispatch, and MKL runs the MLP's matrix-vector products on one thread; here the work runs
   in one OpenMP region of PyTorch's thread pool (see cbam_train.c), phase after phase.
   With bn_a, bn_b (else NULL) the map given is the eval-mode BatchNorm's input y and
   x = y * bn_a + bn_b is formed in registers wherever it is read: the BatchNorm's own pass
   (a read and a write of the map) folded in.
   float32, contiguous (N, C, P) maps; out may be x (then x is overwritten). */

#include <math.h>
#include <omp.h>
#include <stddef.h>

#include "kernels.h"

typedef struct {
    const float *x, *identity;
    const float *bn_a, *bn_b;  /* (C) each, or NULL: x as given */
    long N, C, P;
    int excitation;            /* 0: MLP (fc1, ReLU, fc2); 1: 1-D convolution */
    const float *w1, *b1;      /* fc1: (R, C), (R) or NULL */
    const float *w2, *b2;      /* fc2: (C, R), (C) or NULL */
    long R;
    const float *kernel;       /* 1-D convolution: (K), zero padding (K - 1) / 2 */
    long K;
    float kernel_bias;
    int gate;                  /* 0: sigmoid; 1: hardsigmoid */
    const float *sse_w;        /* scSE: (C) or NULL */
    float sse_b;
    int fusion;                /* scSE: 0 max, 1 sum */
    float *z, *hidden, *g;     /* (N, C), (N, R), (N, C) */
    float *s_part, *s;         /* (T, N, P), (N, P) */
    float *out;
} tail_args;

static void run(const tail_args *a) {
    long N = a->N, C = a->C, P = a->P, rows = N * C;
    int tid = omp_get_thread_num(), threads = omp_get_num_threads();
    float *part = a->sse_w ? a->s_part + (long)tid * N * P : NULL;
    if (part)
        for (long i = 0; i < N * P; i++) part[i] = 0.0f;
    /* squeeze (and sSE's projection, per thread over its rows) */
#pragma omp for schedule(static)
    for (long r = 0; r < rows; r++) {
        const float *restrict v = a->x + r * P;
        float xa = a->bn_a ? a->bn_a[r % C] : 1.0f, xb = a->bn_b ? a->bn_b[r % C] : 0.0f;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (long p = 0; p < P; p++) acc += v[p] * xa + xb;
        a->z[r] = acc / (float)P;
        if (part) {
            float w = a->sse_w[r % C];
            float *restrict dst = part + (r / C) * P;
#pragma omp simd
            for (long p = 0; p < P; p++) dst[p] += w * (v[p] * xa + xb);
        }
    }
    /* excitation */
    if (a->excitation == 0) {
#pragma omp for schedule(static)
        for (long j = 0; j < a->R; j++)
            for (long n = 0; n < N; n++) {
                float t = dot_product(a->w1 + j * C, a->z + n * C, C) + (a->b1 ? a->b1[j] : 0.0f);
                a->hidden[n * a->R + j] = t > 0.0f ? t : 0.0f;
            }
#pragma omp for schedule(static)
        for (long c = 0; c < C; c++)
            for (long n = 0; n < N; n++) {
                float t = dot_product(a->w2 + c * a->R, a->hidden + n * a->R, a->R);
                a->g[n * C + c] = gate_value(t + (a->b2 ? a->b2[c] : 0.0f), a->gate);
            }
    } else {
        long pad = (a->K - 1) / 2;
#pragma omp for schedule(static)
        for (long r = 0; r < rows; r++) {
            long n = r / C, c = r % C;
            float t = 0.0f;
            for (long i = 0; i < a->K; i++) {
                long src = c + i - pad;
                if (src >= 0 && src < C) t += a->kernel[i] * a->z[n * C + src];
            }
            a->g[r] = gate_value(t + a->kernel_bias, a->gate);
        }
    }
    /* sSE's gate: the partial projections summed */
    if (a->sse_w) {
#pragma omp for schedule(static)
        for (long i = 0; i < N * P; i++) {
            float t = a->sse_b;
            for (int k = 0; k < threads; k++) t += a->s_part[(long)k * N * P + i];
            a->s[i] = 1.0f / (1.0f + expf(-t));
        }
    }
    /* apply, residual, ReLU */
#pragma omp for schedule(static)
    for (long r = 0; r < rows; r++) {
        const float *v = a->x + r * P, *restrict id = a->identity + r * P;
        float *out = a->out + r * P; /* may be v: each element is read, then written */
        float g = a->g[r];
        float xa = a->bn_a ? a->bn_a[r % C] : 1.0f, xb = a->bn_b ? a->bn_b[r % C] : 0.0f;
        if (!a->sse_w) {
#pragma omp simd
            for (long p = 0; p < P; p++) {
                float t = (v[p] * xa + xb) * g + id[p];
                out[p] = t > 0.0f ? t : 0.0f;
            }
        } else {
            const float *restrict s = a->s + (r / C) * P;
            if (a->fusion == 0) {
#pragma omp simd
                for (long p = 0; p < P; p++) {
                    float xv = v[p] * xa + xb, cg = xv * g, sg = xv * s[p];
                    float t = (sg > cg ? sg : cg) + id[p];
                    out[p] = t > 0.0f ? t : 0.0f;
                }
            } else {
#pragma omp simd
                for (long p = 0; p < P; p++) {
                    float xv = v[p] * xa + xb, t = xv * g + xv * s[p] + id[p];
                    out[p] = t > 0.0f ? t : 0.0f;
                }
            }
        }
    }
}

void channel_eval_tail(const float *x, const float *identity, const float *bn_a,
                       const float *bn_b, long N, long C, long P,
                       int excitation, const float *w1, const float *b1, const float *w2,
                       const float *b2, long R, const float *kernel, long K, float kernel_bias,
                       int gate, const float *sse_w, float sse_b, int fusion, float *work,
                       float *out, int nthreads) {
    /* work: N * C (z) + N * R (hidden) + N * C (g) + (nthreads + 1) * N * P (scSE only) */
    tail_args a = {x, identity, bn_a, bn_b, N, C, P, excitation, w1, b1, w2, b2, R, kernel, K,
                   kernel_bias, gate, sse_w, sse_b, fusion, work, work + N * C,
                   work + N * C + N * R, NULL, NULL, out};
    if (nthreads < 1) nthreads = 1;
    if (sse_w) {
        a.s = a.g + N * C;
        a.s_part = a.s + N * P;
    }
#pragma omp parallel num_threads(nthreads)
    run(&a);
}
