/* convattn's native CPU kernel for the inference tail of a residual block without attention:

     out = relu(bn(y) + identity)           bn: eval-mode BatchNorm, y * a + b per channel

   one pass where eager PyTorch makes three (BatchNorm into a new map, the residual add, the
   ReLU), so that a plain network's blocks end as cheaply as those whose attention kernels
   fold the same BatchNorm, residual and ReLU (channel_eval.c, cbam_eval.c, gc_eval.c): the
   overhead measured between the two is then the attention's own. The plan (see
   channel_eval.c) holds the BatchNorm; float32, contiguous (N, C, P) maps; out may be y.
   Returns 0, or -1 when the workspace cannot be allocated. */

#include <omp.h>

#include "kernels.h"

/* The layers (convattn.fast._ResidualPlan mirrors this; every field is 8 bytes). */
typedef struct {
    eval_norm bn;
    long C;
} residual_plan;

int residual_eval_tail(const residual_plan *plan, const float *y, const float *identity, long N,
                       long P, float *out, int nthreads) {
    long C = plan->C, rows = N * C;
    float *work = workspace(2 * C); /* the BatchNorm's scale and shift */
    if (!work) return -1;
    float *scale = work, *shift = work + C;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (long c = 0; c < C; c++) eval_norm_fold(&plan->bn, c, scale + c, shift + c);
#pragma omp for schedule(static)
        for (long r = 0; r < rows; r++) {
            const float *v = y + r * P, *restrict id = identity + r * P;
            float *o = out + r * P; /* may be v: each element is read, then written */
            float a = scale[r % C], b = shift[r % C];
#pragma omp simd
            for (long p = 0; p < P; p++) {
                float t = (v[p] * a + b) + id[p];
                o[p] = t > 0.0f ? t : 0.0f;
            }
        }
    }
    free(work);
    return 0;
}
