/* convattn's native CPU kernel for the inference tail of channel attention in a residual
   block, one call instead of eight to twelve PyTorch operations:

     z   = mean_p x                                   (squeeze: global average pool)
     g   = gate(fc2(relu(fc1(z))))                    (SE / cSE excitation)
         or gate(conv1d_k(z))                         (ECA: 1-D convolution across channels)
     s   = sigmoid(w . x[:, p] + b)                   (scSE only: sSE's 1x1 convolution)
     out = relu(x * g + identity)                     (SE, ECA)
         or relu(max(x * g, x * s) + identity), or relu(x * g + x * s + identity)   (scSE)

   ECA without sSE runs as a pipeline over channels (eca_pipeline), which reads the map from
   memory once; the others squeeze the whole map, then apply it, in chunks of images that
   stay in cache between the two passes.

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

/* mean_p (v[p] * xa + xb): a channel's squeeze, its BatchNorm formed in registers */
static inline float row_mean(const float *restrict v, float xa, float xb, long P) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (long p = 0; p < P; p++) acc += v[p] * xa + xb;
    return acc / (float)P;
}

/* out = relu((v * xa + xb) * g + id) over one channel's P positions; out may be v */
static inline void apply_row(const float *v, const float *restrict id, float *out, float xa,
                             float xb, float g, long P) {
#pragma omp simd
    for (long p = 0; p < P; p++) {
        float t = (v[p] * xa + xb) * g + id[p];
        out[p] = t > 0.0f ? t : 0.0f;
    }
}

/* ECA without sSE, as a pipeline over channels: ECA's weight for channel c needs only the
   squeezes of channels c - pad .. c + pad, so each thread walks its share of the (image,
   channel) rows in order, squeezing row j and then applying row j - pad, which it read pad
   rows ago and still finds in its core's cache. The map is read from memory once, at any
   batch. zl is the thread's window of squeezes (zero beyond the image's channels, as the
   convolution's zero padding); the pad rows on either side of its share belong to its
   neighbours, who may write over them (out may be x), so every thread squeezes those first
   (into the window's start and into hb), and all wait for each other before writing. */
/* The per-thread workspace of eca_pipeline, each part from a cache-line boundary: the
   window of squeezes (C + K - 1 at most), then the (K - 1) / 2 squeezes after the share. */
static inline long eca_window(long C, long K) { return (C + K + 15) / 16 * 16; }
static inline long eca_stride(long C, long K) {
    return eca_window(C, K) + (K / 2 + 16) / 16 * 16;
}

static void eca_pipeline(const tail_args *a, float *zl, float *hb) {
    const channel_plan *pl = a->plan;
    long C = pl->C, P = a->P, rows = a->N * C, K = pl->K, pad = (K - 1) / 2;
    int tid = omp_get_thread_num(), threads = omp_get_num_threads();
    long r0 = rows * tid / threads, r1 = rows * (tid + 1) / threads;
    float bias = pl->kernel_bias ? pl->kernel_bias[0] : 0.0f;
    const float *bn_a = a->bn_a, *bn_b = a->bn_b;
    if (r1 > r0) {
        long first = r0 % C, last = (r1 - 1) % C + 1; /* channel range ends of the share */
        const float *x0 = a->x + (r0 / C) * C * P, *x1 = a->x + ((r1 - 1) / C) * C * P;
        for (long j = first - pad; j < first; j++)
            zl[j - first + pad] = j >= 0 ? row_mean(x0 + j * P, bn_a[j], bn_b[j], P) : 0.0f;
        for (long j = last; j < last + pad && j < C; j++)
            hb[j - last] = row_mean(x1 + j * P, bn_a[j], bn_b[j], P);
    }
#pragma omp barrier
    for (long r = r0; r < r1;) {
        long n = r / C, c0 = r % C, c1 = c0 + (r1 - r) < C ? c0 + (r1 - r) : C, lo = c0 - pad;
        long image = n * C * P;
        const float *x = a->x + image, *id = a->identity + image;
        float *out = a->out + image;
        int at_start = r == r0, at_end = r + (c1 - c0) == r1;
        for (long j = lo; j < c1 + pad; j++) {
            if (j < 0 || j >= C)
                zl[j - lo] = 0.0f;
            else if (j >= c1 && at_end)
                zl[j - lo] = hb[j - c1];
            else if (j >= c0 || !at_start)
                zl[j - lo] = row_mean(x + j * P, bn_a[j], bn_b[j], P);
            long i = j - pad; /* the channel whose window of squeezes is now complete */
            if (i < c0) continue;
            float t = 0.0f;
            for (long k = 0; k < K; k++) {
                long src = i + k - pad;
                if (src >= 0 && src < C) t += pl->kernel[k] * zl[src - lo];
            }
            float g = gate_value(t + bias, (int)pl->gate);
            apply_row(x + i * P, id + i * P, out + i * P, bn_a[i], bn_b[i], g, P);
        }
        r += c1 - c0;
    }
}

static void run(const tail_args *a) {
    const channel_plan *pl = a->plan;
    long N = a->N, C = pl->C, P = a->P, R = pl->R, rows = N * C;
    int tid = omp_get_thread_num(), threads = omp_get_num_threads();
    const float *bn_a = a->bn_a, *bn_b = a->bn_b;
#pragma omp for schedule(static)
    for (long c = 0; c < C; c++) eval_norm_fold(&pl->bn, c, a->bn_a + c, a->bn_b + c);
    if (pl->excitation == 1 && !pl->sse_w) { /* ECA: a->stride floats per thread, zl then hb */
        float *zl = a->z + (long)tid * a->stride;
        eca_pipeline(a, zl, zl + eca_window(C, pl->K));
        return;
    }
    float *part = pl->sse_w ? a->s_part + (long)tid * a->stride : NULL;
    if (part)
        for (long i = 0; i < N * P; i++) part[i] = 0.0f;
    /* squeeze (and sSE's projection, per thread over its rows) */
#pragma omp for schedule(static)
    for (long r = 0; r < rows; r++) {
        const float *restrict v = a->x + r * P;
        float xa = bn_a[r % C], xb = bn_b[r % C];
        a->z[r] = row_mean(v, xa, xb, P);
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
            apply_row(v, id, out, xa, xb, g, P);
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
    if (plan->excitation == 1 && !plan->sse_w) {
        /* ECA's pipeline reads the map once: the whole batch in one region; workspace 2C
           (BatchNorm), then eca_stride floats per thread */
        long head = (2 * C + 15) / 16 * 16, stride = eca_stride(C, plan->K);
        float *work = workspace(head + nthreads * stride);
        if (!work) return -1;
        tail_args a = {plan, x, identity, N, P, work, work + C, work + head, NULL, NULL,
                       NULL, NULL, stride, out};
#pragma omp parallel num_threads(nthreads)
        run(&a);
        free(work);
        return 0;
    }
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
