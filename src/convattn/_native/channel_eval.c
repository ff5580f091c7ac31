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
   With a BatchNorm in the plan, the map given is the eval-mode BatchNorm's input y and
   x = y * a + b is formed in registers wherever it is read: the BatchNorm's own pass (a read
   and a write of the map) folded in.

   The layers come as a plan built once by convattn.fast (pointers to the modules' own
   tensors, read at every call); a call passes the maps and their sizes. float32, contiguous
   (N, C, P) maps; out may be x (then x is overwritten). Returns 0, or -1 when the workspace
   cannot be allocated. */

#include <math.h>
#include <omp.h>
#include <stddef.h>

#include "kernels.h"

/* The layers (convattn.fast._ChannelPlan mirrors this; every field is 8 bytes). */
typedef struct {
    eval_norm bn;              /* the block's BatchNorm, folded (bn.mean NULL: none) */
    long C;
    long excitation;           /* 0: MLP (fc1, ReLU, fc2); 1: 1-D convolution */
    const float *w1, *b1;      /* fc1: (R, C), (R) or NULL */
    const float *w2, *b2;      /* fc2: (C, R), (C) or NULL */
    long R;
    const float *kernel;       /* 1-D convolution: (K), zero padding (K - 1) / 2 */
    const float *kernel_bias;  /* (1) or NULL */
    long K;
    long gate;                 /* 0: sigmoid; 1: hardsigmoid */
    const float *sse_w;        /* scSE: (C), or NULL: not scSE */
    const float *sse_b;        /* (1) or NULL */
    long fusion;               /* scSE: 0 max, 1 sum */
} channel_plan;

typedef struct {
    const channel_plan *plan;
    const float *x, *identity;
    long N, P;
    float *bn_a, *bn_b;        /* (C) each */
    float *z, *hidden, *g;     /* (N, C), (N, R), (N, C) */
    float *s_part, *s;         /* T rows of NP (each `stride` long), (N, P) */
    long stride;               /* NP rounded up to whole cache lines: no false sharing */
    float *out;
} tail_args;

static void run(const tail_args *a) {
    const channel_plan *pl = a->plan;
    long N = a->N, C = pl->C, P = a->P, R = pl->R, rows = N * C;
    int tid = omp_get_thread_num(), threads = omp_get_num_threads();
    const float *bn_a = a->bn_a, *bn_b = a->bn_b;
#pragma omp for schedule(static)
    for (long c = 0; c < C; c++) eval_norm_fold(&pl->bn, c, a->bn_a + c, a->bn_b + c);
    float *part = pl->sse_w ? a->s_part + (long)tid * a->stride : NULL;
    if (part)
        for (long i = 0; i < N * P; i++) part[i] = 0.0f;
    /* squeeze (and sSE's projection, per thread over its rows) */
#pragma omp for schedule(static)
    for (long r = 0; r < rows; r++) {
        const float *restrict v = a->x + r * P;
        float xa = bn_a[r % C], xb = bn_b[r % C];
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (long p = 0; p < P; p++) acc += v[p] * xa + xb;
        a->z[r] = acc / (float)P;
        if (part) {
            float w = pl->sse_w[r % C];
            float *restrict dst = part + (r / C) * P;
#pragma omp simd
            for (long p = 0; p < P; p++) dst[p] += w * (v[p] * xa + xb);
        }
    }
    /* excitation */
    if (pl->excitation == 0) {
#pragma omp for schedule(static)
        for (long j = 0; j < R; j++)
            for (long n = 0; n < N; n++) {
                float t = dot_product(pl->w1 + j * C, a->z + n * C, C) + (pl->b1 ? pl->b1[j] : 0.0f);
                a->hidden[n * R + j] = t > 0.0f ? t : 0.0f;
            }
#pragma omp for schedule(static)
        for (long c = 0; c < C; c++)
            for (long n = 0; n < N; n++) {
                float t = dot_product(pl->w2 + c * R, a->hidden + n * R, R);
                a->g[n * C + c] = gate_value(t + (pl->b2 ? pl->b2[c] : 0.0f), (int)pl->gate);
            }
    } else {
        long pad = (pl->K - 1) / 2;
        float bias = pl->kernel_bias ? pl->kernel_bias[0] : 0.0f;
#pragma omp for schedule(static)
        for (long r = 0; r < rows; r++) {
            long n = r / C, c = r % C;
            float t = 0.0f;
            for (long i = 0; i < pl->K; i++) {
                long src = c + i - pad;
                if (src >= 0 && src < C) t += pl->kernel[i] * a->z[n * C + src];
            }
            a->g[r] = gate_value(t + bias, (int)pl->gate);
        }
    }
    /* sSE's gate: the partial projections summed */
    if (pl->sse_w) {
        float bias = pl->sse_b ? pl->sse_b[0] : 0.0f;
#pragma omp for schedule(static)
        for (long i = 0; i < N * P; i++) {
            float t = bias;
            for (int k = 0; k < threads; k++) t += a->s_part[(long)k * a->stride + i];
            a->s[i] = 1.0f / (1.0f + expf(-t));
        }
    }
    /* apply, residual, ReLU */
#pragma omp for schedule(static)
    for (long r = 0; r < rows; r++) {
        const float *v = a->x + r * P, *restrict id = a->identity + r * P;
        float *out = a->out + r * P; /* may be v: each element is read, then written */
        float g = a->g[r];
        float xa = bn_a[r % C], xb = bn_b[r % C];
        if (!pl->sse_w) {
#pragma omp simd
            for (long p = 0; p < P; p++) {
                float t = (v[p] * xa + xb) * g + id[p];
                out[p] = t > 0.0f ? t : 0.0f;
            }
        } else {
            const float *restrict s = a->s + (r / C) * P;
            if (pl->fusion == 0) {
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

int channel_eval_tail(const channel_plan *plan, const float *x, const float *identity, long N,
                      long P, float *out, int nthreads) {
    long C = plan->C, R = plan->R;
    if (nthreads < 1) nthreads = 1;
    long chunk = images_per_chunk(N, C, P);
    long stride = (chunk * P + 15) / 16 * 16; /* 16 floats: 64 bytes */
    /* workspace (for a chunk of images): 2C (BatchNorm) + NC (z) + NR (hidden) + NC (g), then
       for scSE NP (s) and, from a cache-line boundary, T rows of stride floats (the partial
       projections) */
    long head = 2 * C + 2 * chunk * C + chunk * R, parts = (head + chunk * P + 15) / 16 * 16;
    float *work = workspace(plan->sse_w ? parts + nthreads * stride : head);
    if (!work) return -1;
    for (long n0 = 0; n0 < N; n0 += chunk) {
        long k = N - n0 < chunk ? N - n0 : chunk, skip = n0 * C * P;
        tail_args a = {plan, x + skip, identity + skip, k, P, work, work + C, work + 2 * C,
                       work + 2 * C + k * C, work + 2 * C + k * C + k * R, NULL, NULL,
                       stride, out + skip};
        if (plan->sse_w) {
            a.s = work + head;
            a.s_part = work + parts;
        }
#pragma omp parallel num_threads(nthreads)
        run(&a);
    }
    free(work);
    return 0;
}
