/* convattn's native CPU kernels for CBAM's training tail after a batch-statistics BatchNorm.

   The tail is  x = BN(c) = c * s + b  (per-channel scale and shift of the batch statistics),
   x1 = x * cw  (channel gate, per image and channel),
   P = [max_c x1, mean_c x1]  (spatial descriptor),  sw = sigmoid(conv(P))  (spatial gate),
   y = relu(x1 * sw + identity).
   Eager ATen needs a dozen full passes over the feature map forward and some thirty backward
   (products, reductions, masks, rebuilds, autograd's sums); on a CPU whose caches the maps of
   a training batch do not fit, each pass costs a trip to DRAM. These kernels make three passes
   forward and four backward, recomputing x and x1 from c in registers instead of storing them.
   The small parts (the channel MLP, the 7x7 convolution, the gates) stay in PyTorch.

   All maps are float32, contiguous (N, C, P) with P = H * W; per-image vectors are (N, C) or
   (N, P). Products are written  (c * s + b) * cw  exactly as the eager code rounds them
   (compiled with -ffp-contract=off), so a value recomputed here equals the one the forward
   pass compared against a maximum. Work is split over images (or rows) between the threads of PyTorch's OpenMP pool. */

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

typedef void (*range_fn)(const void *args, long begin, long end);

/* fn(args, begin, end) over [0, n) split evenly between nthreads OpenMP threads. Built with
   -fopenmp, this library needs libgomp.so.1, which the dynamic loader resolves to the copy
   PyTorch already loaded: the kernels share PyTorch's thread pool instead of competing with
   its spinning workers. */
static void parallel_for(range_fn fn, const void *args, long n, int nthreads) {
    if (nthreads > n) nthreads = (int)n;
    if (nthreads <= 1) {
        fn(args, 0, n);
        return;
    }
#pragma omp parallel num_threads(nthreads)
    {
        long t = omp_get_thread_num(), T = omp_get_num_threads();
        fn(args, n * t / T, n * (t + 1) / T);
    }
}

/* ---- forward 1: per-row statistics of c ---------------------------------------------------
   For each of the N * C rows: mean and sum of squared deviations around it (two passes over a
   row, the second from cache), maximum and minimum. Per channel, the batch mean and biased
   variance combined from the rows (Chan et al.'s pairwise update), in double. */

typedef struct {
    const float *c;
    long C, P;
    double *row_mean, *row_m2;
    float *row_max, *row_min;
} stats_args;

static void stats_rows(const void *a, long begin, long end) {
    const stats_args *s = (const stats_args *)a;
    for (long r = begin; r < end; r++) {
        const float *v = s->c + r * s->P;
        double sum = 0.0;
        float hi = v[0], lo = v[0];
#pragma omp simd reduction(+ : sum) reduction(max : hi) reduction(min : lo)
        for (long p = 0; p < s->P; p++) {
            sum += v[p];
            hi = v[p] > hi ? v[p] : hi;
            lo = v[p] < lo ? v[p] : lo;
        }
        double mean = sum / (double)s->P, m2 = 0.0;
#pragma omp simd reduction(+ : m2)
        for (long p = 0; p < s->P; p++) {
            double d = (double)v[p] - mean;
            m2 += d * d;
        }
        s->row_mean[r] = mean;
        s->row_m2[r] = m2;
        s->row_max[r] = hi;
        s->row_min[r] = lo;
    }
}

void cbam_row_stats(const float *c, long N, long C, long P, double *mean, double *var,
                    float *row_mean, float *row_max, float *row_min, double *work, int nthreads) {
    /* work: 2 * N * C doubles */
    stats_args args = {c, C, P, work, work + N * C, row_max, row_min};
    parallel_for(stats_rows, &args, N * C, nthreads);
    for (long ch = 0; ch < C; ch++) {
        double m = 0.0, m2 = 0.0, count = 0.0;
        for (long n = 0; n < N; n++) {
            double rm = work[n * C + ch], rm2 = work[N * C + n * C + ch];
            double total = count + (double)P, delta = rm - m;
            m += delta * (double)P / total;
            m2 += rm2 + delta * delta * count * (double)P / total;
            count = total;
        }
        mean[ch] = m;
        var[ch] = m2 / count;
    }
    for (long r = 0; r < N * C; r++) row_mean[r] = (float)work[r];
}

/* ---- forward 2: spatial descriptor ---------------------------------------------------------
   P2[n, 0, p] = max_c x1, P2[n, 1, p] = mean_c x1, ties[n, p] = how many channels reach the
   maximum (the backward pass shares the maximum's gradient between them, as amax does). */

typedef struct {
    const float *c, *s, *b, *cw;
    long C, P;
    float *pooled, *ties;
} spool_args;

static void spatial_pool_images(const void *a, long begin, long end) {
    const spool_args *g = (const spool_args *)a;
    long C = g->C, P = g->P;
    for (long n = begin; n < end; n++) {
        float *restrict hi = g->pooled + n * 2 * P, *restrict sum = hi + P;
        float *restrict cnt = g->ties + n * P;
        for (long p = 0; p < P; p++) {
            hi[p] = -INFINITY;
            sum[p] = 0.0f;
            cnt[p] = 0.0f;
        }
        for (long ch = 0; ch < C; ch++) {
            const float *restrict v = g->c + (n * C + ch) * P;
            float sc = g->s[ch], sh = g->b[ch], w = g->cw[n * C + ch];
            for (long p = 0; p < P; p++) {
                float x1 = (v[p] * sc + sh) * w;
                float h = hi[p], gt = x1 > h ? 1.0f : 0.0f, eq = x1 == h ? 1.0f : 0.0f;
                sum[p] += x1;
                cnt[p] = cnt[p] * (1.0f - gt) + gt + eq; /* a new maximum restarts the count */
                hi[p] = x1 > h ? x1 : h;
            }
        }
        for (long p = 0; p < P; p++) sum[p] /= (float)C;
    }
}

void cbam_spatial_pool(const float *c, const float *s, const float *b, const float *cw, long N,
                       long C, long P, float *pooled, float *ties, int nthreads) {
    spool_args args = {c, s, b, cw, C, P, pooled, ties};
    parallel_for(spatial_pool_images, &args, N, nthreads);
}

/* ---- forward 3: y = relu(x1 * sw + identity) ------------------------------------------------ */

typedef struct {
    const float *c, *s, *b, *cw, *sw, *identity;
    long C, P;
    float *y;
} apply_args;

static void apply_images(const void *a, long begin, long end) {
    const apply_args *g = (const apply_args *)a;
    long C = g->C, P = g->P;
    for (long n = begin; n < end; n++) {
        const float *sw = g->sw + n * P;
        for (long ch = 0; ch < C; ch++) {
            long off = (n * C + ch) * P;
            const float *restrict v = g->c + off, *restrict id = g->identity + off;
            float *restrict y = g->y + off;
            float sc = g->s[ch], sh = g->b[ch], w = g->cw[n * C + ch];
            for (long p = 0; p < P; p++) {
                float t = (v[p] * sc + sh) * w * sw[p] + id[p];
                y[p] = t > 0.0f ? t : 0.0f;
            }
        }
    }
}

void cbam_apply(const float *c, const float *s, const float *b, const float *cw, const float *sw,
                const float *identity, long N, long C, long P, float *y, int nthreads) {
    apply_args args = {c, s, b, cw, sw, identity, C, P, y};
    parallel_for(apply_images, &args, N, nthreads);
}

/* ---- backward ------------------------------------------------------------------------------
   g_y the output gradient; m = g_y where y > 0 (the ReLU's mask), also identity's gradient.
   g_x1 = m * sw + g_mean / C + [x1 == max_c x1] * g_max / ties   (spatial pool's backward)
   g_cw = sum_p g_x1 * x
   g_x  = g_x1 * cw + g_avg / P + [x == max_p x] * g_peak / peak_ties   (channel pool's)
   g_c  = s * g_x + alpha * (c - mean) + beta   (BatchNorm's backward, batch statistics) */

typedef struct {
    const float *gy, *y, *c, *s, *b, *cw, *sw;
    long C, P;
    float *m, *g_sw;
} back1_args;

/* m and g_sw = sum_c m * x1 (the spatial gate's gradient) */
static void back1_images(const void *a, long begin, long end) {
    const back1_args *g = (const back1_args *)a;
    long C = g->C, P = g->P;
    for (long n = begin; n < end; n++) {
        float *restrict gsw = g->g_sw + n * P;
        for (long p = 0; p < P; p++) gsw[p] = 0.0f;
        for (long ch = 0; ch < C; ch++) {
            long off = (n * C + ch) * P;
            const float *restrict v = g->c + off, *restrict gy = g->gy + off, *restrict y = g->y + off;
            float *restrict m = g->m + off;
            float sc = g->s[ch], sh = g->b[ch], w = g->cw[n * C + ch];
            for (long p = 0; p < P; p++) {
                float mp = y[p] > 0.0f ? gy[p] : 0.0f;
                m[p] = mp;
                gsw[p] += mp * ((v[p] * sc + sh) * w);
            }
        }
    }
}

void cbam_backward_mask(const float *gy, const float *y, const float *c, const float *s,
                        const float *b, const float *cw, const float *sw, long N, long C, long P,
                        float *m, float *g_sw, int nthreads) {
    back1_args args = {gy, y, c, s, b, cw, sw, C, P, m, g_sw};
    parallel_for(back1_images, &args, N, nthreads);
}

typedef struct {
    const float *m, *c, *s, *b, *cw, *sw, *g_pooled, *pooled, *ties;
    const float *peak, *g_avg, *g_peak, *peak_ties; /* channel pool (N, C); g_* NULL in pass 2 */
    const double *mean;
    const float *alpha, *beta;                      /* pass 4 */
    long C, P;
    float *g_cw, *peak_count; /* pass 2 */
    double *sum_gx, *sum_gxc; /* pass 3, (N, C) */
    float *g_c;               /* pass 4 */
    int pass;
} back_args;

/* Passes 2-4 recompute g_x1 (and g_x) from m and c per element:
   pass 2: g_cw and the channel maximum's tie count;
   pass 3: per image and channel, sum g_x and sum g_x * (c - mean);
   pass 4: g_c. */
static void back_images(const void *a, long begin, long end) {
    const back_args *g = (const back_args *)a;
    long C = g->C, P = g->P;
    float inv_c = 1.0f / (float)C, inv_p = 1.0f / (float)P;
    float *restrict share = (float *)malloc(sizeof(float) * 2 * (size_t)P);
    if (share == NULL) abort();
    float *restrict top = share + P;
    for (long n = begin; n < end; n++) {
        const float *restrict sw = g->sw + n * P, *gmax = g->g_pooled + n * 2 * P;
        const float *gmean = gmax + P, *hi = g->pooled + n * 2 * P, *ties = g->ties + n * P;
        for (long p = 0; p < P; p++) {
            share[p] = gmean[p] * inv_c;
            top[p] = ties[p] > 0.0f ? gmax[p] / ties[p] : 0.0f;
        }
        for (long ch = 0; ch < C; ch++) {
            long off = (n * C + ch) * P, nc = n * C + ch;
            const float *restrict v = g->c + off, *restrict m = g->m + off;
            float sc = g->s[ch], sh = g->b[ch], w = g->cw[nc], peak = g->peak[nc];
            if (g->pass == 2) {
                double acc = 0.0;
                float count = 0.0f;
#pragma omp simd reduction(+ : acc, count)
                for (long p = 0; p < P; p++) {
                    float x = v[p] * sc + sh, x1 = x * w;
                    float gx1 = m[p] * sw[p] + share[p] + (x1 == hi[p] ? top[p] : 0.0f);
                    acc += (double)(gx1 * x);
                    count += x == peak ? 1.0f : 0.0f;
                }
                g->g_cw[nc] = (float)acc;
                g->peak_count[nc] = count;
                continue;
            }
            float avg_share = g->g_avg[nc] * inv_p;
            float peak_share = g->peak_ties[nc] > 0.0f ? g->g_peak[nc] / g->peak_ties[nc] : 0.0f;
            if (g->pass == 3) {
                double sum = 0.0, sum_c = 0.0, mu = g->mean[ch];
#pragma omp simd reduction(+ : sum, sum_c)
                for (long p = 0; p < P; p++) {
                    float x = v[p] * sc + sh, x1 = x * w;
                    float gx1 = m[p] * sw[p] + share[p] + (x1 == hi[p] ? top[p] : 0.0f);
                    float gx = gx1 * w + avg_share + (x == peak ? peak_share : 0.0f);
                    sum += gx;
                    sum_c += (double)gx * ((double)v[p] - mu);
                }
                g->sum_gx[nc] = sum;
                g->sum_gxc[nc] = sum_c;
            } else {
                float *restrict out = g->g_c + off, al = g->alpha[ch], be = g->beta[ch];
                float mu = (float)g->mean[ch];
                for (long p = 0; p < P; p++) {
                    float x = v[p] * sc + sh, x1 = x * w;
                    float gx1 = m[p] * sw[p] + share[p] + (x1 == hi[p] ? top[p] : 0.0f);
                    float gx = gx1 * w + avg_share + (x == peak ? peak_share : 0.0f);
                    out[p] = sc * gx + al * (v[p] - mu) + be;
                }
            }
        }
    }
    free(share);
}

void cbam_backward_gate(const float *m, const float *c, const float *s, const float *b,
                        const float *cw, const float *sw, const float *g_pooled,
                        const float *pooled, const float *ties, const float *peak, long N, long C,
                        long P, float *g_cw, float *peak_count, int nthreads) {
    back_args args = {m, c, s, b, cw, sw, g_pooled, pooled, ties, peak, NULL, NULL, NULL,
                      NULL, NULL, NULL, C, P, g_cw, peak_count, NULL, NULL, NULL, 2};
    parallel_for(back_images, &args, N, nthreads);
}

void cbam_backward_sums(const float *m, const float *c, const float *s, const float *b,
                        const float *cw, const float *sw, const float *g_pooled,
                        const float *pooled, const float *ties, const float *peak,
                        const float *g_avg, const float *g_peak, const float *peak_ties,
                        const double *mean, long N, long C, long P, double *sum_gx,
                        double *sum_gxc, int nthreads) {
    back_args args = {m, c, s, b, cw, sw, g_pooled, pooled, ties, peak, g_avg, g_peak,
                      peak_ties, mean, NULL, NULL, C, P, NULL, NULL, sum_gx, sum_gxc, NULL, 3};
    parallel_for(back_images, &args, N, nthreads);
}

void cbam_backward_input(const float *m, const float *c, const float *s, const float *b,
                         const float *cw, const float *sw, const float *g_pooled,
                         const float *pooled, const float *ties, const float *peak,
                         const float *g_avg, const float *g_peak, const float *peak_ties,
                         const double *mean, const float *alpha, const float *beta, long N,
                         long C, long P, float *g_c, int nthreads) {
    back_args args = {m, c, s, b, cw, sw, g_pooled, pooled, ties, peak, g_avg, g_peak,
                      peak_ties, mean, alpha, beta, C, P, NULL, NULL, NULL, NULL, g_c, 4};
    parallel_for(back_images, &args, N, nthreads);
}
