/*
 * gathered_gemm: a matrix product that reads only selected rows and column
 * groups of its weight, without copying them out first.
 *
 *   out[m, n] = act(bias[row(m)]
 *                   + sum_{j < kc, t < G} W[row(m), col(j) * G + t] * cols[j * G + t, n])
 *
 * with row(m) = rows ? rows[m] : m and col(j) = cidx ? cidx[j] : j. For a
 * convolution, cols is the im2col matrix of its (open) input channels, G the
 * kernel size kh * kw, rows the open output channels and cidx the open input
 * channels. At batch 1 on small maps a convolution is bound by reading its
 * weight; gathering the open channels first (and oneDNN's reorder of the
 * gathered copy) passes the weight through memory three more times, which
 * this product does not.
 *
 * Layouts: W (*, ldw), cols (kc * G, N) and out (M, N), all row-major float32;
 * rows and cidx int64. The caller guarantees the indices are in range.
 */
#include <stdint.h>
#include <stdlib.h>

/* Register tile: MB weight rows times NC outputs (four 16-lane vectors). */
#define MB 6
#define NC 64
/* Rows of cols per pass, so that a pass's slice of cols stays in L2. */
#define RC 2048

static void tile_generic(const float* const* wr, long mb, const int32_t* woff,
                         long r0, long r1, const float* cols, long N, long n0,
                         float* out, long ldo, int first)
{
    long nn = N - n0 < NC ? N - n0 : NC;
    for (long i = 0; i < mb; i++) {
        float acc[NC];
        float* o = out + i * ldo + n0;
        for (long n = 0; n < nn; n++) acc[n] = first ? 0.f : o[n];
        for (long r = r0; r < r1; r++) {
            float w = wr[i][woff[r]];
            const float* c = cols + r * N + n0;
            for (long n = 0; n < nn; n++) acc[n] += w * c[n];
        }
        for (long n = 0; n < nn; n++) o[n] = acc[n];
    }
}

#ifdef __AVX512F__
#include <immintrin.h>

static void tile_avx512(const float* const* wr, long mb, const int32_t* woff,
                        long r0, long r1, const float* cols, long N, long n0,
                        float* out, long ldo, int first)
{
    if (mb < MB) {  /* the last, partial tile: rare, keep it simple */
        tile_generic(wr, mb, woff, r0, r1, cols, N, n0, out, ldo, first);
        return;
    }
    long nn = N - n0 < NC ? N - n0 : NC;
    __mmask16 k[4];
    for (int q = 0; q < 4; q++) {
        long rem = nn - 16 * q;
        k[q] = rem >= 16 ? (__mmask16)0xFFFF
                         : (rem <= 0 ? (__mmask16)0 : (__mmask16)((1u << rem) - 1));
    }
    /* Named accumulators so that the compiler keeps all 24 in registers. */
#define LOAD(i, q) (first ? _mm512_setzero_ps() \
                          : _mm512_maskz_loadu_ps(k[q], out + (i) * ldo + n0 + 16 * (q)))
#define DECL(i) __m512 a##i##0 = LOAD(i, 0), a##i##1 = LOAD(i, 1), \
                       a##i##2 = LOAD(i, 2), a##i##3 = LOAD(i, 3); \
                const float* w##i = wr[i];
    DECL(0) DECL(1) DECL(2) DECL(3) DECL(4) DECL(5)
    const float* c = cols + r0 * N + n0;
    for (long r = r0; r < r1; r++, c += N) {
        long o = woff[r];
        __m512 c0 = _mm512_maskz_loadu_ps(k[0], c);
        __m512 c1 = _mm512_maskz_loadu_ps(k[1], c + 16);
        __m512 c2 = _mm512_maskz_loadu_ps(k[2], c + 32);
        __m512 c3 = _mm512_maskz_loadu_ps(k[3], c + 48);
#define FMA(i) { __m512 w = _mm512_set1_ps(w##i[o]); \
                 a##i##0 = _mm512_fmadd_ps(w, c0, a##i##0); \
                 a##i##1 = _mm512_fmadd_ps(w, c1, a##i##1); \
                 a##i##2 = _mm512_fmadd_ps(w, c2, a##i##2); \
                 a##i##3 = _mm512_fmadd_ps(w, c3, a##i##3); }
        FMA(0) FMA(1) FMA(2) FMA(3) FMA(4) FMA(5)
    }
#define STORE(i) _mm512_mask_storeu_ps(out + (i) * ldo + n0, k[0], a##i##0); \
                 _mm512_mask_storeu_ps(out + (i) * ldo + n0 + 16, k[1], a##i##1); \
                 _mm512_mask_storeu_ps(out + (i) * ldo + n0 + 32, k[2], a##i##2); \
                 _mm512_mask_storeu_ps(out + (i) * ldo + n0 + 48, k[3], a##i##3);
    STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5)
#undef LOAD
#undef DECL
#undef FMA
#undef STORE
}
#define TILE tile_avx512
#else
#define TILE tile_generic
#endif

/* Returns 0, or -1 if memory for the column offsets could not be had. */
int gathered_gemm(const float* W, long ldw, const int64_t* rows, long M,
                  const int64_t* cidx, long kc, long G,
                  const float* cols, long N, const float* bias, int relu,
                  float* out, int nthreads)
{
    long K = kc * G, tiles = (M + MB - 1) / MB;
    /* Offset of each row of cols within a weight row. */
    int32_t* woff = (int32_t*)malloc(sizeof(int32_t) * (K > 0 ? K : 1));
    if (!woff)
        return -1;
    for (long j = 0; j < kc; j++)
        for (long t = 0; t < G; t++)
            woff[j * G + t] = (int32_t)((cidx ? cidx[j] : j) * G + t);
    for (long n0 = 0; n0 < N; n0 += NC)
        for (long r0 = 0; r0 < K || r0 == 0; r0 += RC) {
            long r1 = r0 + RC < K ? r0 + RC : K;
            #pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
            for (long b = 0; b < tiles; b++) {
                long m0 = b * MB, mb = M - m0 < MB ? M - m0 : MB;
                const float* wr[MB];
                for (long i = 0; i < MB; i++)
                    wr[i] = W + (rows ? rows[m0 + (i < mb ? i : 0)] : m0 + (i < mb ? i : 0)) * ldw;
                TILE(wr, mb, woff, r0, r1, cols, N, n0, out + m0 * N, N, r0 == 0);
            }
        }
    free(woff);
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (long m = 0; m < M; m++) {
        float b = bias ? bias[rows ? rows[m] : m] : 0.f;
        float* o = out + m * N;
        for (long n = 0; n < N; n++) {
            float v = o[n] + b;
            o[n] = relu && v < 0.f ? 0.f : v;
        }
    }
    return 0;
}
