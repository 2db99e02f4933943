/*
 * The inner loops of the batch-shaping loss (see
 * mmgated/ops/batch_shaping.py): the column-wise sort of the gate values
 * over the batch, the Beta prior's CDF with its density at the sorted
 * values, and Eq. (2) with its gradient from those. As PyTorch operations
 * these are some forty dispatches on a few thousand values each training
 * step, most of the loss's time.
 */
#include <math.h>

#ifdef MMGATED_LIBMVEC
/* glibc declares its vector logf and expf (libmvec) only under -ffast-math;
 * the loops below need them, not fast math's reordering. */
#pragma omp declare simd notinbranch
float logf(float);
#pragma omp declare simd notinbranch
float expf(float);
#endif

/*
 * Column-wise argsort of a small batch: order[:, c] sorts x[:, c]
 * ascending. An odd-even transposition network (N rounds of
 * compare-exchanges between neighbouring rows), branch-free and vectorised
 * across the C columns: a data-dependent sort mispredicts a branch for
 * most comparisons. x (N, C); work: 2 * N * C floats; order (N, C).
 */
void argsort_columns(const float* x, long N, long C, float* work,
                     long* order)
{
    float* v = work;
    float* id = work + N * C;  /* row indices, exact as floats */
    for (long i = 0; i < N; i++)
        for (long c = 0; c < C; c++) {
            v[i * C + c] = x[i * C + c];
            id[i * C + c] = (float)i;
        }
    for (long r = 0; r < N; r++)
        for (long i = r & 1; i + 1 < N; i += 2) {
            float* a = v + i * C;
            float* b = a + C;
            float* ia = id + i * C;
            float* ib = ia + C;
            #pragma omp simd
            for (long c = 0; c < C; c++) {
                float x0 = a[c], x1 = b[c], i0 = ia[c], i1 = ib[c];
                int swap = x0 > x1;
                a[c] = swap ? x1 : x0;
                b[c] = swap ? x0 : x1;
                ia[c] = swap ? i1 : i0;
                ib[c] = swap ? i0 : i1;
            }
        }
    for (long i = 0; i < N * C; i++)
        order[i] = (long)id[i];
}

/*
 * The Beta(a, b) CDF and density at n values x, from the piecewise-cubic
 * table of mmgated.models.losses.priors.betainc_table (rows base, c0, c1,
 * c2, c3 of K intervals each), in float32 like PyTorch's float32 path:
 *
 *   i = min(floor(K x), K - 1), t = K x - i
 *   power = x^a (1 - x)^b / B(a, b)
 *   cdf   = clamp(base[i] + power * (c0 + t (c1 + t (c2 + t c3)))[i], 0, 1)
 *   pdf   = x^(a - 1) (1 - x)^(b - 1) / B(a, b) at x clamped to [eps, 1 - eps]
 *
 * Inside [low, high] = [eps, 1 - eps] the density is power / (x (1 - x)),
 * with no further logarithm; below and above it, pdf_low and pdf_high.
 * Values beyond [0, 1] get the CDF of the nearest end and density 0; NaN
 * gives NaN. Branch-free, so that with glibc's vector logf and expf the loop
 * runs 8 values at a time.
 */
static void beta_cdf_pdf_range(const float* x, long begin, long end,
                               const float* table, long K, float a,
                               float b, float log_beta, float low,
                               float high, float pdf_low, float pdf_high,
                               float* cdf, float* pdf)
{
    const float last = (float)(K - 1);
    #pragma omp simd
    for (long j = begin; j < end; j++) {
        float xj = x[j];
        /* NaN fails both comparisons and stays NaN through v */
        float v = xj < 0.f ? 0.f : (xj > 1.f ? 1.f : xj);
        float u = v * (float)K;
        int i = (int)(u < last ? u : last);
        float t = u - (float)i;
        float cubic = ((table[4 * K + i] * t + table[3 * K + i]) * t +
                       table[2 * K + i]) * t + table[K + i];
        /* exactly 0 at 0 and 1: logf(0) = -inf */
        float power = expf(a * logf(v) + b * logf(1.f - v) - log_beta);
        float value = table[i] + power * cubic;
        cdf[j] = value < 0.f ? 0.f : (value > 1.f ? 1.f : value);
        float density = v < low ? pdf_low
                        : (v > high ? pdf_high
                           : power / (v * (1.f - v)));
        pdf[j] = xj == v ? density : (xj == xj ? 0.f : xj);
    }
}

void beta_cdf_pdf(const float* x, long n, const float* table, long K,
                  float a, float b, float log_beta, float low, float high,
                  float pdf_low, float pdf_high, float* cdf, float* pdf,
                  int nthreads)
{
    const long block = 2048;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && n >= 2 * block)
    for (long begin = 0; begin < n; begin += block)
        beta_cdf_pdf_range(x, begin, begin + block < n ? begin + block : n,
                           table, K, a, b, log_beta, low, high, pdf_low,
                           pdf_high, cdf, pdf);
}

/*
 * Eq. (2) of the paper (lambda = 1) for C columns of N sorted values, from
 * their prior CDF and density:
 *
 *   r[i, c] = (i + 1) / (N + 1) - cdf[i, c]
 *   value   = scale / N * sum_{i, c} r[i, c]^2
 *   grad[order[i, c], c] = -2 scale / N * r[i, c] * pdf[i, c]
 *
 * the gradient going back to the rows the sorted values came from (only
 * if grad is not NULL). Returns the value.
 */
double cramer_von_mises_sorted(const float* cdf, const float* pdf,
                               const long* order, long N, long C,
                               double scale, float* grad)
{
    double total = 0.0;
    const float step = (float)(-2.0 * scale / (double)N);
    for (long i = 0; i < N; i++) {
        const float target = (float)((double)(i + 1) / (double)(N + 1));
        const float* cdf_row = cdf + i * C;
        double row_total = 0.0;
        #pragma omp simd reduction(+:row_total)
        for (long c = 0; c < C; c++) {
            float r = target - cdf_row[c];
            row_total += (double)r * (double)r;
        }
        total += row_total;
        if (grad) {
            const float* pdf_row = pdf + i * C;
            const long* order_row = order + i * C;
            for (long c = 0; c < C; c++)
                grad[order_row[c] * C + c] =
                    step * (target - cdf_row[c]) * pdf_row[c];
        }
    }
    return total * scale / (double)N;
}
