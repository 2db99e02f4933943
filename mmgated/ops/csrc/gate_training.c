/*
 * The training forward and backward of a gating module and of the gated
 * ReLU, each in one call (see mmgated/ops/gate_training.py).
 *
 * Gating module, for a batch of N block inputs x (N, C, HW):
 *
 *   pooled[n, c]  = mean_hw x[n, c, hw]
 *   hidden[n, k]  = sum_c W1[k, c] * pooled[n, c]
 *   xhat[n, k]    = (hidden[n, k] - mean_n hidden[., k]) * invstd[k]
 *   active[n, k]  = relu(xhat[n, k] * bn_w[k] + bn_b[k])
 *   logits[n, o]  = b2[o] + sum_k W2[o, k] * active[n, k]
 *   relaxed       = (logits + noise) / tau  (the caller takes the sigmoid)
 *   gates         = logits + noise > 0
 *
 * with the batch statistics of a BN in training (biased variance for the
 * normalisation, unbiased for the running variance, as PyTorch). The module
 * is some twenty operations on a few hundred values; as PyTorch operations
 * their dispatch and autograd bookkeeping cost many times the arithmetic.
 *
 * Gated ReLU, for a map x (N, C, HW) and gates g (N, C):
 *
 *   forward:  out = relu(x) * g
 *   backward: grad_x = g && x > 0 ? grad_out : 0,
 *             grad_g[n, c] = sum_hw grad_out * relu(x)
 *
 * one pass over the map each way. All arrays are row-major float32.
 */
#include <math.h>
#include <stddef.h>

/*
 * out[j] = scale * sum_i coeffs[i * coeff_stride] * rows[i * row_stride + j]
 * for j < len: a product with a small matrix, its inner loop over a
 * contiguous row. Every weight gradient of the gating module is one. The
 * sums run in tiles of 16 that stay in registers over all rows: summing
 * into out itself would store and reload it once per row.
 */
#define COMBINE_TILE 16
static void combine_rows(float* out, long len, const float* coeffs,
                         long coeff_stride, const float* rows,
                         long row_stride, long count, float scale)
{
    long j0 = 0;
    for (; j0 + COMBINE_TILE <= len; j0 += COMBINE_TILE) {
        float sums[COMBINE_TILE] = {0.f};
        for (long i = 0; i < count; i++) {
            float c = scale * coeffs[i * coeff_stride];
            const float* r = rows + i * row_stride + j0;
            #pragma omp simd
            for (int j = 0; j < COMBINE_TILE; j++)
                sums[j] += c * r[j];
        }
        for (int j = 0; j < COMBINE_TILE; j++)
            out[j0 + j] = sums[j];
    }
    for (long j = j0; j < len; j++) {
        float s = 0.f;
        for (long i = 0; i < count; i++)
            s += scale * coeffs[i * coeff_stride] * rows[i * row_stride + j];
        out[j] = s;
    }
}

/* sum_i a[i] * b[i]: a row of a small matrix product (the FCs of the
 * gating modules, here and in gate_logits.c). */
float dot_product(const float* a, const float* b, long n)
{
    float s = 0.f;
    #pragma omp simd reduction(+:s)
    for (long i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* Mean over HW of each of the P planes of x (also gate_logits.c's). */
void pool_planes(const float* x, long P, long HW, float* pooled,
                        int nthreads)
{
    float inv = 1.0f / (float)HW;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && P * HW >= 65536)
    for (long p = 0; p < P; p++) {
        const float* v = x + p * HW;
        float s = 0.f;
        #pragma omp simd reduction(+:s)
        for (long i = 0; i < HW; i++)
            s += v[i];
        pooled[p] = s * inv;
    }
}

/*
 * What the forward keeps for the backward, in one workspace of
 * gate_train_workspace_size floats: pooled (N, C), xhat and active (N, K),
 * invstd (K), then scratch space: N * (O + 2 * K) floats for the backward,
 * K * O for the forward. One allocation instead of five, for every gate of
 * every training step.
 */
typedef struct {
    float *pooled, *xhat, *active, *invstd, *scratch;
} gate_workspace;

static gate_workspace workspace_layout(float* base, long N, long C, long K)
{
    gate_workspace w;
    w.pooled = base;
    w.xhat = w.pooled + N * C;
    w.active = w.xhat + N * K;
    w.invstd = w.active + N * K;
    w.scratch = w.invstd + K;
    return w;
}

long gate_train_workspace_size(long N, long C, long K, long O)
{
    long backward = N * (O + 2 * K), forward = K * O;
    return N * C + 2 * N * K + K + (backward > forward ? backward : forward);
}

/*
 * Outputs: the workspace (above), logits, relaxed (before its sigmoid),
 * gates (N, O). running_mean / running_var (K) are updated with momentum
 * when not NULL; bn_w / bn_b may be NULL (no affine). Returns 0, or -1 for
 * N < 2 (no batch variance).
 */
int gate_train_forward(const float* x, long N, long C, long HW,
                       const float* w1, long K, const float* bn_w,
                       const float* bn_b, float* running_mean,
                       float* running_var, double momentum, double eps,
                       const float* w2, const float* b2, long O,
                       const float* noise, double tau, float* workspace,
                       float* logits, float* relaxed, float* gates,
                       int nthreads)
{
    if (N < 2)
        return -1;
    gate_workspace ws = workspace_layout(workspace, N, C, K);
    float *pooled = ws.pooled, *xhat = ws.xhat, *active = ws.active;
    float *invstd = ws.invstd, *scratch = ws.scratch;
    pool_planes(x, N * C, HW, pooled, nthreads);
    for (long n = 0; n < N; n++)
        for (long k = 0; k < K; k++)  /* hidden, normalised below */
            xhat[n * K + k] = dot_product(w1 + k * C, pooled + n * C, C);
    for (long k = 0; k < K; k++) {
        double mean = 0.0, var = 0.0;
        for (long n = 0; n < N; n++)
            mean += xhat[n * K + k];
        mean /= (double)N;
        for (long n = 0; n < N; n++) {
            double d = xhat[n * K + k] - mean;
            var += d * d;
        }
        double biased = var / (double)N;
        float is = (float)(1.0 / sqrt(biased + eps));
        invstd[k] = is;
        if (running_mean != NULL) {
            running_mean[k] = (float)(momentum * mean
                                      + (1.0 - momentum) * running_mean[k]);
            running_var[k] = (float)(momentum * var / (double)(N - 1)
                                     + (1.0 - momentum) * running_var[k]);
        }
        float scale = bn_w != NULL ? bn_w[k] : 1.f;
        float shift = bn_b != NULL ? bn_b[k] : 0.f;
        for (long n = 0; n < N; n++) {
            float v = (float)(xhat[n * K + k] - mean) * is;
            xhat[n * K + k] = v;
            v = v * scale + shift;
            active[n * K + k] = v > 0.f ? v : 0.f;
        }
    }
    /* The output layer row by row, as sums over k of active[n, k] times
     * a row of the transposed weights (K, O): vectorised over the
     * outputs, with the sums in registers (combine_rows). */
    float* w2t = scratch;  /* (K, O) */
    for (long o = 0; o < O; o++)
        for (long k = 0; k < K; k++)
            w2t[k * O + o] = w2[o * K + k];
    float inv_tau = (float)(1.0 / tau);
    for (long n = 0; n < N; n++) {
        float* row = logits + n * O;
        combine_rows(row, O, active + n * K, 1, w2t, O, K, 1.f);
        const float* draws = noise + n * O;
        float* soft = relaxed + n * O;
        float* hard = gates + n * O;
        #pragma omp simd
        for (long o = 0; o < O; o++) {
            float s = row[o] + b2[o];
            float noisy = s + draws[o];
            row[o] = s;
            soft[o] = noisy * inv_tau;
            hard[o] = noisy > 0.f ? 1.f : 0.f;
        }
    }
    return 0;
}

/*
 * Gradients of the gating module from those of its outputs; any of
 * grad_logits, grad_probs, grad_relaxed, grad_gates may be NULL (no
 * gradient). workspace: the forward's (its scratch space is overwritten).
 * Outputs (each may be NULL when not needed): grad_pooled (N, C) (the
 * gradient of x is its broadcast over HW, divided by HW here), grad_w1
 * (K, C), grad_bn_w, grad_bn_b (K), grad_w2 (O, K), grad_b2 (O).
 */
void gate_train_backward(long N, long C, long HW, long K, long O,
                         const float* grad_logits, const float* grad_probs,
                         const float* grad_relaxed, const float* grad_gates,
                         float* workspace, const float* probs,
                         const float* relaxed, const float* w1,
                         const float* bn_w, const float* w2, double tau,
                         float* grad_pooled, float* grad_w1,
                         float* grad_bn_w, float* grad_bn_b, float* grad_w2,
                         float* grad_b2)
{
    gate_workspace ws = workspace_layout(workspace, N, C, K);
    const float *pooled = ws.pooled, *xhat = ws.xhat, *active = ws.active;
    const float* invstd = ws.invstd;
    float* scratch = ws.scratch;
    float* gl = scratch;             /* (N, O) gradient of the logits */
    float* gy = scratch + N * O;     /* (N, K) before the ReLU */
    float* gh = gy + N * K;          /* (N, K) of the hidden layer */
    float inv_tau = (float)(1.0 / tau);
    long NO = N * O;
    /* One branch-free loop per given gradient, so that each vectorises. */
    for (long i = 0; i < NO; i++)
        gl[i] = grad_logits != NULL ? grad_logits[i] : 0.f;
    if (grad_probs != NULL) {
        #pragma omp simd
        for (long i = 0; i < NO; i++)
            gl[i] += grad_probs[i] * probs[i] * (1.f - probs[i]);
    }
    /* The hard gates pass the relaxed sample's gradient. */
    const float* single = grad_relaxed != NULL ? grad_relaxed : grad_gates;
    if (grad_relaxed != NULL && grad_gates != NULL) {
        #pragma omp simd
        for (long i = 0; i < NO; i++)
            gl[i] += (grad_relaxed[i] + grad_gates[i]) * relaxed[i]
                     * (1.f - relaxed[i]) * inv_tau;
    } else if (single != NULL) {
        #pragma omp simd
        for (long i = 0; i < NO; i++)
            gl[i] += single[i] * relaxed[i] * (1.f - relaxed[i]) * inv_tau;
    }
    if (grad_b2 != NULL) {
        for (long o = 0; o < O; o++)
            grad_b2[o] = 0.f;
        for (long n = 0; n < N; n++) {
            #pragma omp simd
            for (long o = 0; o < O; o++)
                grad_b2[o] += gl[n * O + o];
        }
    }
    if (grad_w2 != NULL)
        for (long o = 0; o < O; o++)
            combine_rows(grad_w2 + o * K, K, gl + o, O, active, K, N, 1.f);
    for (long n = 0; n < N; n++) {
        float* row = gy + n * K;
        combine_rows(row, K, gl + n * O, 1, w2, K, O, 1.f);
        for (long k = 0; k < K; k++)
            if (!(active[n * K + k] > 0.f))
                row[k] = 0.f;
    }
    for (long k = 0; k < K; k++) {
        float sum_g = 0.f, sum_gx = 0.f;
        for (long n = 0; n < N; n++) {
            sum_g += gy[n * K + k];
            sum_gx += gy[n * K + k] * xhat[n * K + k];
        }
        if (grad_bn_b != NULL)
            grad_bn_b[k] = sum_g;
        if (grad_bn_w != NULL)
            grad_bn_w[k] = sum_gx;
        /* Through the batch statistics: with g = gy * w, the gradient of
         * the BN input is invstd * (g - mean(g) - xhat * mean(g * xhat)). */
        float scale = bn_w != NULL ? bn_w[k] : 1.f;
        float mean_g = scale * sum_g / (float)N;
        float mean_gx = scale * sum_gx / (float)N;
        for (long n = 0; n < N; n++)
            gh[n * K + k] = invstd[k] * (scale * gy[n * K + k] - mean_g
                                         - xhat[n * K + k] * mean_gx);
    }
    if (grad_w1 != NULL)
        for (long k = 0; k < K; k++)
            combine_rows(grad_w1 + k * C, C, gh + k, K, pooled, C, N, 1.f);
    if (grad_pooled != NULL)
        for (long n = 0; n < N; n++)
            combine_rows(grad_pooled + n * C, C, gh + n * K, 1, w1, C, K,
                         1.0f / (float)HW);
}

void gated_relu_forward(const float* x, const float* gates, long P,
                        long HW, float* out, int nthreads)
{
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && P * HW >= 65536)
    for (long p = 0; p < P; p++) {
        const float* v = x + p * HW;
        float* o = out + p * HW;
        float g = gates[p];
        #pragma omp simd
        for (long i = 0; i < HW; i++)
            o[i] = (v[i] > 0.f ? v[i] : 0.f) * g;
    }
}

/* grad_x may be NULL (not needed), grad_gates too. */
void gated_relu_backward(const float* grad_out, const float* x,
                         const float* gates, long P, long HW, float* grad_x,
                         float* grad_gates, int nthreads)
{
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && P * HW >= 65536)
    for (long p = 0; p < P; p++) {
        const float* g = grad_out + p * HW;
        const float* v = x + p * HW;
        if (grad_x != NULL) {
            float* gx = grad_x + p * HW;
            if (gates[p] != 0.f) {
                #pragma omp simd
                for (long i = 0; i < HW; i++)
                    gx[i] = v[i] > 0.f ? g[i] : 0.f;
            } else {
                for (long i = 0; i < HW; i++)
                    gx[i] = 0.f;
            }
        }
        if (grad_gates != NULL) {
            float s = 0.f;
            #pragma omp simd reduction(+:s)
            for (long i = 0; i < HW; i++)
                s += g[i] * (v[i] > 0.f ? v[i] : 0.f);
            grad_gates[p] = s;
        }
    }
}
