/*
 * Products that read only selected rows and input channels of a weight,
 * without copying them out first.
 *
 * Both entry points compute, for output row m and output n,
 *
 *   out[m, n] = act(bias[row(m)] + res[row(m), n]
 *                   + sum_{j < kc, t < G} W[row(m), col(j) * G + t] * src(j, t, n))
 *
 * with row(m) = rows ? rows[m] : m and col(j) = cidx ? cidx[j] : j; for a
 * convolution the open output channels and the open input channels of a
 * weight with G = kh * kw taps. They differ in where src(j, t, n) lies:
 *
 * - gathered_gemm: in an im2col matrix, row j * G + t.
 * - gathered_conv: in the map itself, for a stride-1 convolution whose
 *   output has the input's size ("same" padding). The map is first copied
 *   into a scratch map with zero rows above and below it; there output
 *   position n = y * W + x reads tap (a, b) at n + a * dh * W + b * dw - pw,
 *   so a tile of 64 consecutive positions reads 64 consecutive values per
 *   tap: no im2col, and no position computed in vain. Where a tap falls
 *   left or right of the map (x + b * dw - pw outside [0, W)), that lane's
 *   read is masked to zero: each column tile has one mask per tap column b.
 *
 * At batch 1 a convolution reads its whole weight for few pixels; gathering
 * the open channels first, and oneDNN's reorder of the gathered copy into its
 * blocked layout, pass the weight through memory twice more, which these
 * products do not. The tiles are vectorised over output pixels, so the
 * weight is read in its own layout.
 *
 * All arrays are row-major float32 (indices int64). Both return -2, before
 * any work, if an index is out of range.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Register tile: MB weight rows times NC outputs (four 16-lane vectors with
 * AVX-512; AVX2 runs it in chunks of two 8-lane vectors). */
#define MB 6
#define NC 64
/* Reduction rows (channel taps) per pass, so a pass's source stays in L2. */
#define RC 2048
/* Bytes of weight rows per pass below which column tiles are the outer
 * loop (see product); skip execution's DIRECT_WEIGHT_BYTES matches it. */
#define L2_WEIGHTS (512 * 1024)

/*
 * Where the reduction reads: input channel j's tap (a, b), a < kh, b < kw,
 * lies at src + j * plane + a * rowstep + b * step, and its weight at
 * wr[i][wch[j] + a * kw + b]. An im2col matrix is the case kh = 1, kw = G,
 * step = N, plane = G * N. mask_columns: the tap columns with lane masks
 * of their own, kw for a convolution's left and right borders; with 1, all
 * tap columns read by the first column's (the positions of the tile).
 */
typedef struct {
    const int32_t* wch;
    long kh, kw, rowstep, step, plane;
    long mask_columns;
} Taps;

/* The most tap columns with masks of their own (gathered_conv's limit on
 * kw). */
#define KW_MAX 16

typedef struct {
    const float* const* wr;  /* MB weight rows (the first repeated past mb) */
    long mb;                 /* rows stored */
    const Taps* taps;
    long j0, j1;             /* input channels of this pass */
    const float* src;        /* source, at the tile's first position */
    long nn;                 /* positions of the tile (<= NC) */
    /* 4 lane masks (16 positions each) per Taps.mask_columns: which reads
     * of the tile are inside the map. */
    const uint16_t* masks;
    float* out;              /* row 0's output at the tile's first position */
    long ldo;
    int first, last;         /* first / last pass over the reduction */
    const float* bias;       /* MB values, added on the last pass */
    const float* const* res; /* MB rows added on the last pass, or NULL */
    int relu;
} Tile;

/* The column of masks that tap column b reads by, and its masks in a tile. */
#define MASK_COLUMN(P, b) ((P)->mask_columns > 1 ? (b) : 0)
#define TAP_MASKS(T, b) ((T)->masks + 4 * MASK_COLUMN((T)->taps, b))

/*
 * A tile pass's reduction: STEP(c, o, b, centre) for each input channel of
 * the pass and each tap, with c the tap's source at the tile's first
 * position (src0 at the pass's first channel), o the tap's column in a
 * weight row, b its tap column and centre whether b is the middle one,
 * which stays inside the rows of a "same" convolution (no edge lanes). The
 * common 3x3 kernel is unrolled, without per-tap index loads, and
 * prefetches LINES cache lines of its rows AHEAD channels on: they are
 * planes away, too far for the hardware prefetcher to see in time.
 */
#define REDUCE(T, src0, STEP, AHEAD, LINES) do { \
    const Taps* tp_ = (T)->taps; \
    const float* ch_ = (src0); \
    if (tp_->kh == 3 && tp_->kw == 3) { \
        long rs_ = tp_->rowstep, st_ = tp_->step; \
        for (long j_ = (T)->j0; j_ < (T)->j1; j_++, ch_ += tp_->plane) { \
            long col_ = tp_->wch[j_]; \
            for (int a_ = 0; a_ < 3; a_++) { \
                const float* row_ = ch_ + a_ * rs_; \
                const char* pf_ = (const char*)(row_ + (AHEAD) * tp_->plane); \
                for (int l_ = 0; l_ < (LINES); l_++) \
                    _mm_prefetch(pf_ + 64 * l_, _MM_HINT_T0); \
                STEP(row_, col_ + 3 * a_, 0, 0) \
                STEP(row_ + st_, col_ + 3 * a_ + 1, 1, 1) \
                STEP(row_ + 2 * st_, col_ + 3 * a_ + 2, 2, 0) \
            } \
        } \
    } else { \
        for (long j_ = (T)->j0; j_ < (T)->j1; j_++, ch_ += tp_->plane) { \
            long col_ = tp_->wch[j_]; \
            for (long a_ = 0; a_ < tp_->kh; a_++) \
                for (long b_ = 0; b_ < tp_->kw; b_++) \
                    STEP(ch_ + a_ * tp_->rowstep + b_ * tp_->step, \
                         col_ + a_ * tp_->kw + b_, b_, \
                         2 * b_ + 1 == tp_->kw) \
        } \
    } \
} while (0)

/* Add a pass's sums acc (the tile's nn positions) of row i to its outputs;
 * the last pass adds the bias and the residual, then the ReLU. For the
 * tiles without masked stores. */
static inline void store_pass(const Tile* T, int i, const float* acc)
{
    float* o = T->out + i * T->ldo;
    const float* r = T->res ? T->res[i] : NULL;
    for (long n = 0; n < T->nn; n++) {
        float value = acc[n] + (T->first ? 0.f : o[n]);
        if (T->last) {
            value += T->bias[i] + (r ? r[n] : 0.f);
            if (T->relu && value < 0.f) value = 0.f;
        }
        o[n] = value;
    }
}

#if !defined(__AVX512F__) && !(defined(__AVX2__) && defined(__FMA__))
/* The plain C tile, for builds without AVX-512 or AVX2 and FMA. */
static void tile_generic(const Tile* T)
{
    const Taps* P = T->taps;
    for (long i = 0; i < T->mb; i++) {
        float acc[NC] = {0.f};
        for (long j = T->j0; j < T->j1; j++)
            for (long a = 0; a < P->kh; a++)
                for (long b = 0; b < P->kw; b++) {
                    float w = T->wr[i][P->wch[j] + a * P->kw + b];
                    const float* c = T->src + j * P->plane + a * P->rowstep
                                     + b * P->step;
                    const uint16_t* m = TAP_MASKS(T, b);
                    for (long n = 0; n < T->nn; n++)
                        if ((m[n / 16] >> (n % 16)) & 1)
                            acc[n] += w * c[n];
                }
        store_pass(T, (int)i, acc);
    }
}

#endif

#ifdef __AVX512F__
#include <immintrin.h>

/* A tile of R <= MB rows and V <= 4 vectors of outputs; R and V are
 * constants wherever this is inlined, so that the rows and vectors past them
 * cost nothing (small maps leave the last tile of a row part empty). */
static inline __attribute__((always_inline)) void tile_rows(const Tile* T,
                                                            const int R,
                                                            const int V)
{
    const Taps* P = T->taps;
    /* The lanes of the tile's positions, for its outputs. */
    __mmask16 k[4];
    for (int q = 0; q < 4; q++) {
        long rem = T->nn - 16 * q;
        k[q] = rem >= 16 ? (__mmask16)0xFFFF
                         : (rem <= 0 ? (__mmask16)0 : (__mmask16)((1u << rem) - 1));
    }
    float* out = T->out;
    long ldo = T->ldo;
    int first = T->first;
    /* Named accumulators so that the compiler keeps all 24 in registers. */
#define LOAD(i, q) (first || (i) >= R ? _mm512_setzero_ps() \
        : _mm512_maskz_loadu_ps(k[q], out + (i) * ldo + 16 * (q)))
#define DECL(i) __m512 a##i##0 = LOAD(i, 0), a##i##1 = LOAD(i, 1), \
                       a##i##2 = LOAD(i, 2), a##i##3 = LOAD(i, 3); \
                const float* w##i = T->wr[i];
    DECL(0) DECL(1) DECL(2) DECL(3) DECL(4) DECL(5)
#define FMA(i, o) if ((i) < R) { __m512 w = _mm512_set1_ps(w##i[o]); \
        a##i##0 = _mm512_fmadd_ps(w, c0, a##i##0); \
        if (V > 1) a##i##1 = _mm512_fmadd_ps(w, c1, a##i##1); \
        if (V > 2) a##i##2 = _mm512_fmadd_ps(w, c2, a##i##2); \
        if (V > 3) a##i##3 = _mm512_fmadd_ps(w, c3, a##i##3); }
    /* One reduction row: 16 * V source values at c, those of tap column b
     * inside the map, times weight column o. Masked loads cost what plain
     * ones do here, so the middle tap column (centre) is masked as well. */
#define VLOAD(q, p, m) (V > (q) ? _mm512_maskz_loadu_ps((__mmask16)(m)[q], p) \
                                : _mm512_setzero_ps())
#define STEP(c, o, b, centre) { const float* s_ = (c); long o_ = (o); \
        const uint16_t* m_ = TAP_MASKS(T, b); \
        __m512 c0 = VLOAD(0, s_, m_), c1 = VLOAD(1, s_ + 16, m_), \
               c2 = VLOAD(2, s_ + 32, m_), c3 = VLOAD(3, s_ + 48, m_); \
        FMA(0, o_) FMA(1, o_) FMA(2, o_) FMA(3, o_) FMA(4, o_) FMA(5, o_) }
    REDUCE(T, T->src + T->j0 * P->plane, STEP, 1, 5);
    const __m512 zero = _mm512_setzero_ps();
    /* The last pass adds the bias and the residual, then the ReLU. */
#define FINISH(i, q) ({ __m512 v_ = a##i##q; if (T->last) { \
        v_ = _mm512_add_ps(v_, _mm512_set1_ps(T->bias[i])); \
        if (T->res) v_ = _mm512_add_ps(v_, _mm512_maskz_loadu_ps(k[q], T->res[i] + 16 * (q))); \
        if (T->relu) v_ = _mm512_max_ps(v_, zero); } v_; })
#define STORE(i) if ((i) < R) { \
        _mm512_mask_storeu_ps(out + (i) * ldo, k[0], FINISH(i, 0)); \
        if (V > 1) _mm512_mask_storeu_ps(out + (i) * ldo + 16, k[1], FINISH(i, 1)); \
        if (V > 2) _mm512_mask_storeu_ps(out + (i) * ldo + 32, k[2], FINISH(i, 2)); \
        if (V > 3) _mm512_mask_storeu_ps(out + (i) * ldo + 48, k[3], FINISH(i, 3)); }
    STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5)
#undef LOAD
#undef DECL
#undef FMA
#undef VLOAD
#undef STEP
#undef FINISH
#undef STORE
}
static void tile_avx512(const Tile* T)
{
    long vectors = (T->nn + 15) / 16;
#define ROWS(R) switch (vectors) { \
        case 4: tile_rows(T, R, 4); break; \
        case 3: tile_rows(T, R, 3); break; \
        case 2: tile_rows(T, R, 2); break; \
        default: tile_rows(T, R, 1); break; }
    switch (T->mb) {
    case 6: ROWS(6) break;
    case 5: ROWS(5) break;
    case 4: ROWS(4) break;
    case 3: ROWS(3) break;
    case 2: ROWS(2) break;
    default: ROWS(1) break;
    }
#undef ROWS
}
#define TILE tile_avx512
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* The 8 lanes of a mask whose bit l selects lane l. */
static inline __m256i lanes_of(unsigned bits)
{
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(
        _mm256_and_si256(_mm256_set1_epi32((int)bits), bit), bit);
}

/* How a chunk of the AVX2 tile reads its source: whole (16 positions, no
 * edges), whole and then masked by the tap column's lanes (a convolution's
 * map, read in place between guards, see gathered_conv: plain loads and an
 * AND are faster than masked loads on AMD; the middle tap column needs no
 * mask, its lanes past the map are not stored), or by masked loads (the
 * last chunk of an im2col matrix, which has no guard). */
enum { READ_ALL, READ_AND, READ_MASKED };

/* One chunk of 16 positions of R rows over the pass's reduction, into acc,
 * reading the source as HOW says. */
static inline __attribute__((always_inline)) void chunk2(
    const Tile* T, float acc[MB][NC], long q, const int R, const int HOW)
{
    const Taps* P = T->taps;
    __m256i mk[KW_MAX][2];
    for (long b = 0; HOW != READ_ALL && b < P->mask_columns; b++) {
        unsigned bits = TAP_MASKS(T, b)[q];
        mk[b][0] = lanes_of(bits & 0xFF);
        mk[b][1] = lanes_of(bits >> 8);
    }
#define READ(p, m) (HOW == READ_ALL ? _mm256_loadu_ps(p) \
        : HOW == READ_AND ? _mm256_and_ps(_mm256_loadu_ps(p), \
                                          _mm256_castsi256_ps(m)) \
        : _mm256_maskload_ps(p, m))
#define DECL(i) __m256 a##i##0 = _mm256_setzero_ps(), \
                       a##i##1 = _mm256_setzero_ps(); \
                const float* w##i = T->wr[i];
    DECL(0) DECL(1) DECL(2) DECL(3) DECL(4) DECL(5)
#define FMA(i, o) if ((i) < R) { __m256 w = _mm256_broadcast_ss(w##i + (o)); \
        a##i##0 = _mm256_fmadd_ps(w, c0, a##i##0); \
        a##i##1 = _mm256_fmadd_ps(w, c1, a##i##1); }
#define STEP(c, o, b, centre) { const float* s_ = (c); long o_ = (o); \
        long e_ = MASK_COLUMN(P, b); \
        __m256 c0, c1; \
        if (HOW == READ_AND && (centre)) { \
            c0 = _mm256_loadu_ps(s_); \
            c1 = _mm256_loadu_ps(s_ + 8); \
        } else { \
            c0 = READ(s_, mk[e_][0]); \
            c1 = READ(s_ + 8, mk[e_][1]); \
        } \
        FMA(0, o_) FMA(1, o_) FMA(2, o_) FMA(3, o_) FMA(4, o_) FMA(5, o_) }
    /* Two channels ahead measured a little faster than one on an AMD EPYC. */
    REDUCE(T, T->src + T->j0 * P->plane + 16 * q, STEP, 2, 2);
#define SAVE(i) if ((i) < R) { _mm256_store_ps(acc[i] + 16 * q, a##i##0); \
        _mm256_store_ps(acc[i] + 16 * q + 8, a##i##1); }
    SAVE(0) SAVE(1) SAVE(2) SAVE(3) SAVE(4) SAVE(5)
#undef READ
#undef DECL
#undef FMA
#undef STEP
#undef SAVE
}

/*
 * The AVX2 tile: R <= MB rows, the tile's positions in chunks of 16 (two
 * 8-lane vectors), so that the 12 accumulators, two source vectors and a
 * weight broadcast fit the 16 vector registers. The sums of the pass go to
 * a local buffer, and a scalar loop adds them to the outputs (a few hundred
 * operations against the pass's MB * 64 * taps multiply-adds).
 */
static inline __attribute__((always_inline)) void tile_rows2(const Tile* T,
                                                             const int R)
{
    float acc[MB][NC] __attribute__((aligned(32)));
    for (long q = 0; 16 * q < T->nn; q++) {
        /* Whether every tap of the chunk's 16 positions is inside. */
        int inside = 1;
        for (long b = 0; b < T->taps->mask_columns; b++)
            inside &= TAP_MASKS(T, b)[q] == 0xFFFF;
        if (inside)
            chunk2(T, acc, q, R, READ_ALL);
        else if (T->taps->mask_columns > 1)
            chunk2(T, acc, q, R, READ_AND);
        else
            chunk2(T, acc, q, R, READ_MASKED);
    }
    for (int i = 0; i < R; i++)
        store_pass(T, i, acc[i]);
}
static void tile_avx2(const Tile* T)
{
    switch (T->mb) {
    case 6: tile_rows2(T, 6); break;
    case 5: tile_rows2(T, 5); break;
    case 4: tile_rows2(T, 4); break;
    case 3: tile_rows2(T, 3); break;
    case 2: tile_rows2(T, 2); break;
    default: tile_rows2(T, 1); break;
    }
}
#define TILE tile_avx2
#endif

#ifndef TILE
#define TILE tile_generic
#endif

/*
 * The shared loop: M rows, N positions, kc input channels read through
 * taps; masks: per column tile, 4 lane masks per tap column with masks of
 * its own (see Tile). res: residual rows ldr apart, indexed like the bias,
 * or NULL.
 */
static void product(const float* W, long ldw, const int64_t* rows, long M,
                    const Taps* taps, long kc, const float* src, long N,
                    const uint16_t* masks, const float* bias,
                    const float* res, long ldr, int relu, float* out,
                    long ldo, int nthreads)
{
    long row_tiles = (M + MB - 1) / MB, col_tiles = (N + NC - 1) / NC;
    long tiles = row_tiles * col_tiles, G = taps->kh * taps->kw;
    long jc = RC / G > 0 ? RC / G : 1, per_tile = 4 * taps->mask_columns;
    int columns_outer = (double)M * (jc < kc ? jc : kc) * G * sizeof(float)
                        <= L2_WEIGHTS;
    for (long j0 = 0; j0 < kc || j0 == 0; j0 += jc) {
        long j1 = j0 + jc < kc ? j0 + jc : kc;
        /* Each thread takes a contiguous run of tiles. Where the weight
         * rows of the product fit in L2, column tiles are the outer order:
         * a thread keeps its columns of the map in cache over all rows
         * (large maps, small weights: the early stages). Otherwise row
         * tiles are: a thread keeps its weight rows over all columns. */
        #pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
        for (long b = 0; b < tiles; b++) {
            long rt = columns_outer ? b % row_tiles : b / col_tiles;
            long ct = columns_outer ? b / row_tiles : b % col_tiles;
            long m0 = rt * MB, n0 = ct * NC;
            long mb = M - m0 < MB ? M - m0 : MB;
            const float* wr[MB];
            const float* rr[MB];
            float tile_bias[MB];
            for (long i = 0; i < MB; i++) {
                long row = rows ? rows[m0 + (i < mb ? i : 0)] : m0 + (i < mb ? i : 0);
                wr[i] = W + row * ldw;
                rr[i] = res ? res + row * ldr + n0 : NULL;
                tile_bias[i] = bias ? bias[row] : 0.f;
            }
            Tile T = {wr, mb, taps, j0, j1, src + n0, N - n0 < NC ? N - n0 : NC,
                      masks + per_tile * ct, out + m0 * ldo + n0, ldo,
                      j0 == 0, j1 == kc, tile_bias, res ? rr : NULL, relu};
            TILE(&T);
        }
    }
}

/*
 * The lane masks of product's column tiles over N positions: per tile and
 * tap column b < nb, bit l of mask q is set where position n = 16 q + l of
 * the tile exists and, in rows of width (> 0), has its tap inside the row:
 * 0 <= n % width + b * step - pad < width. Without width, nb = 1 and the
 * masks are the tiles' positions. NULL without memory.
 */
static uint16_t* column_masks(long N, long width, long nb, long step,
                              long pad)
{
    long col_tiles = (N + NC - 1) / NC;
    uint16_t* masks = (uint16_t*)calloc(col_tiles * nb * 4 > 0 ? col_tiles * nb * 4 : 1,
                                        sizeof(uint16_t));
    if (!masks)
        return NULL;
    for (long n = 0, x = 0; n < N; n++) {
        uint16_t* m = masks + (n / NC) * nb * 4 + (n % NC) / 16;
        for (long b = 0; b < nb; b++) {
            long tap = x + b * step - pad;
            if (width <= 0 || (tap >= 0 && tap < width))
                m[4 * b] |= (uint16_t)(1u << (n % 16));
        }
        if (width > 0 && ++x == width)
            x = 0;
    }
    return masks;
}

/* 1 if the tiles are vectorised (AVX-512, or AVX2 with FMA), 0 for the
 * plain C ones, where a direct convolution does not beat oneDNN. */
int gathered_product_vectorized(void)
{
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
    return 1;
#else
    return 0;
#endif
}

/* Whether all n indices (none if idx is NULL) lie in [0, size). */
static int in_range(const int64_t* idx, long n, long size)
{
    for (long i = 0; idx && i < n; i++)
        if (idx[i] < 0 || idx[i] >= size)
            return 0;
    return 1;
}

/* Offsets of the input channels' taps in a weight row; NULL without
 * memory. */
static int32_t* channel_offsets(const int64_t* cidx, long kc, long G)
{
    int32_t* wch = (int32_t*)malloc(sizeof(int32_t) * (kc > 0 ? kc : 1));
    if (wch)
        for (long j = 0; j < kc; j++)
            wch[j] = (int32_t)((cidx ? cidx[j] : j) * G);
    return wch;
}

/*
 * W (R, ldw = C * G), cols (kc * G, N), out (M, N). Returns 0, -1 without
 * memory, -2 for an index out of range.
 */
int gathered_gemm(const float* W, long R, long ldw, const int64_t* rows,
                  long M, const int64_t* cidx, long kc, long G,
                  const float* cols, long N, const float* bias, int relu,
                  float* out, int nthreads)
{
    if (!in_range(rows, M, R) || !in_range(cidx, kc, ldw / G))
        return -2;
    int32_t* wch = channel_offsets(cidx, kc, G);
    uint16_t* masks = column_masks(N, 0, 1, 0, 0);
    if (!wch || !masks) {
        free(wch);
        free(masks);
        return -1;
    }
    Taps taps = {wch, 1, G, 0, N, G * N, 1};
    product(W, ldw, rows, M, &taps, kc, cols, N, masks, bias, NULL, 0, relu,
            out, N, nthreads);
    free(wch);
    free(masks);
    return 0;
}

/*
 * A stride-1 convolution whose output has the input's size H x Wd: input x
 * (kc, H, Wd), weight W (R, ldw = C * kh * kw) of kh x kw taps at dilation
 * (dh, dw) and padding (ph, pw) with dh * (kh - 1) = 2 * ph and
 * dw * (kw - 1) = 2 * pw, kw <= KW_MAX, out (M, H, Wd); res (R, H, Wd) or
 * NULL. Returns 0, -1 without memory, -2 for an index out of range, -3 for
 * kw > KW_MAX.
 */
int gathered_conv(const float* W, long R, long ldw, const int64_t* rows,
                  long M, const int64_t* cidx, long kc, long kh, long kw,
                  long dh, long dw, long ph, long pw, const float* x, long H,
                  long Wd, const float* bias, const float* res, int relu,
                  float* out, int nthreads)
{
    if (!in_range(rows, M, R) || !in_range(cidx, kc, ldw / (kh * kw)))
        return -2;
    if (kw > KW_MAX)
        return -3;
    /* Each channel's map between ph zero rows above and below; a guard of
     * zeros before the first and after the last covers the reads of the
     * border taps and of the last tile's vectors past the map (masked). */
    long plane = (H + 2 * ph) * Wd, N = H * Wd, guard = pw + NC;
    int32_t* wch = channel_offsets(cidx, kc, kh * kw);
    float* scratch = (float*)malloc(sizeof(float) * (kc * plane + 2 * guard));
    uint16_t* masks = column_masks(N, Wd, kw, dw, pw);
    if (!wch || !scratch || !masks) {
        free(wch);
        free(scratch);
        free(masks);
        return -1;
    }
    float* maps = scratch + guard;
    memset(scratch, 0, sizeof(float) * guard);
    memset(maps + kc * plane, 0, sizeof(float) * guard);
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (long j = 0; j < kc; j++) {
        float* p = maps + j * plane;
        memset(p, 0, sizeof(float) * ph * Wd);
        memcpy(p + ph * Wd, x + j * N, sizeof(float) * N);
        memset(p + (H + ph) * Wd, 0, sizeof(float) * ph * Wd);
    }
    Taps taps = {wch, kh, kw, dh * Wd, dw, plane, kw};
    product(W, ldw, rows, M, &taps, kc, maps - pw, N, masks, bias, res, N,
            relu, out, N, nthreads);
    free(wch);
    free(scratch);
    free(masks);
    return 0;
}
